//! Given / when / then tests of the order rules; no database.

use es::Aggregate as _;
use uuid::Uuid;

use super::*;

fn line(sku: &str, quantity: i64, price: i64) -> OrderLine {
    OrderLine {
        sku: Sku::parse(sku).expect("sku"),
        quantity: Quantity::new(quantity).expect("quantity"),
        unit_price: UnitPrice::new(price).expect("price"),
    }
}

fn create(lines: Vec<OrderLine>) -> OrderCommand {
    OrderCommand::Create {
        order_id: Uuid::from_u128(1),
        user_id: Uuid::from_u128(2),
        currency: Currency::parse("eur").expect("currency"),
        lines,
    }
}

/// Given `events`, when `command`, then the result.
fn given(events: &[OrderEvent]) -> Order {
    Order::replay(events)
}

#[test]
fn creating_an_order_records_lines_and_total() {
    let events = given(&[])
        .handle(create(vec![line("A-1", 2, 1250), line("B-2", 1, 500)]))
        .expect("accepted");
    let [
        OrderEvent::Created {
            total_minor,
            currency,
            lines,
            ..
        },
    ] = events.as_slice()
    else {
        panic!("expected one Created event, got {events:?}");
    };
    assert_eq!(*total_minor, 3000);
    assert_eq!(currency.as_str(), "EUR");
    assert_eq!(lines.len(), 2);
    let order = given(&events);
    assert_eq!(order.status, Some(OrderStatus::Created));
    assert_eq!(order.version, 1);
}

#[test]
fn an_order_cannot_be_created_twice() {
    let events = given(&[])
        .handle(create(vec![line("A", 1, 1)]))
        .expect("accepted");
    assert_eq!(
        given(&events).handle(create(vec![line("A", 1, 1)])),
        Err(OrderError::AlreadyExists {
            status: OrderStatus::Created
        })
    );
}

#[test]
fn an_empty_order_is_refused() {
    assert_eq!(given(&[]).handle(create(vec![])), Err(OrderError::NoLines));
}

#[test]
fn too_many_lines_are_refused() {
    let lines = (0..=MAX_LINES)
        .map(|i| line(&format!("S{i}"), 1, 1))
        .collect();
    assert_eq!(
        given(&[]).handle(create(lines)),
        Err(OrderError::TooManyLines)
    );
}

#[test]
fn the_largest_order_still_fits() {
    let lines = (0..MAX_LINES)
        .map(|i| line(&format!("S{i}"), i64::from(Quantity::MAX), UnitPrice::MAX))
        .collect::<Vec<_>>();
    assert!(total_minor(&lines).is_some());
}

#[test]
fn line_values_are_parsed() {
    assert_eq!(Quantity::new(0), Err(LineError::QuantityOutOfRange));
    assert_eq!(Quantity::new(-3), Err(LineError::QuantityOutOfRange));
    assert_eq!(Quantity::new(10_001), Err(LineError::QuantityOutOfRange));
    assert_eq!(UnitPrice::new(-1), Err(LineError::NegativePrice));
    assert_eq!(Sku::parse(" "), Err(LineError::Empty));
    assert_eq!(Sku::parse("bad sku"), Err(LineError::BadSku));
    assert_eq!(Currency::parse("EURO"), Err(CurrencyError::Malformed));
    assert_eq!(Currency::parse(""), Err(CurrencyError::Empty));
}

#[test]
fn events_round_trip_through_json() {
    let events = given(&[])
        .handle(create(vec![line("A-1", 2, 1250)]))
        .expect("accepted");
    let json = serde_json::to_value(&events[0]).expect("serialize");
    assert_eq!(json["type"], "created");
    assert_eq!(json["lines"][0]["unit_price"], 1250);
    let back: OrderEvent = serde_json::from_value(json).expect("deserialize");
    assert_eq!(back, events[0]);
}

#[test]
fn stored_events_with_invalid_values_do_not_load() {
    let json = serde_json::json!({
        "type": "created", "order_id": Uuid::from_u128(1), "user_id": Uuid::from_u128(2),
        "currency": "EUR", "total_minor": 1,
        "lines": [{"sku": "A", "quantity": 0, "unit_price": 1}]
    });
    assert!(serde_json::from_value::<OrderEvent>(json).is_err());
}
