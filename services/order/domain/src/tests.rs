//! Given / when / then tests of every order rule, a property test over random
//! command sequences, and the fixtures of every stored event version. No
//! database.

use es::{Aggregate as _, DomainEvent as _};
use proptest::prelude::*;
use uuid::Uuid;

use super::*;

const ORDER: Uuid = Uuid::from_u128(1);
const USER: Uuid = Uuid::from_u128(2);

fn line(sku: &str, quantity: i64, price: i64) -> OrderLine {
    OrderLine {
        sku: Sku::parse(sku).expect("sku"),
        quantity: Quantity::new(quantity).expect("quantity"),
        unit_price: UnitPrice::new(price).expect("price"),
    }
}

fn address() -> ShippingAddress {
    ShippingAddress {
        name: AddressLine::parse("Ada Lovelace").expect("name"),
        line1: AddressLine::parse("12 St James's Square").expect("line1"),
        line2: None,
        city: AddressLine::parse("London").expect("city"),
        postal_code: AddressLine::parse("SW1Y 4JH").expect("postal code"),
        country: CountryCode::parse("gb").expect("country"),
    }
}

fn create(lines: Vec<OrderLine>) -> OrderCommand {
    OrderCommand::Create {
        order_id: ORDER,
        user_id: USER,
        currency: Currency::parse("eur").expect("currency"),
        lines,
        shipping_address: address(),
    }
}

fn pay(amount_minor: i64) -> OrderCommand {
    OrderCommand::Pay {
        payment_reference: PaymentReference::parse("pay_1").expect("ref"),
        amount: Amount::new(amount_minor).expect("amount"),
    }
}

fn ship() -> OrderCommand {
    OrderCommand::Ship {
        carrier: Carrier::parse("DHL").expect("carrier"),
        tracking_number: TrackingNumber::parse("JD014600").expect("tracking"),
    }
}

fn cancel() -> OrderCommand {
    OrderCommand::Cancel {
        reason: CancelReason::parse("changed my mind").expect("reason"),
    }
}

/// Runs `commands` from an empty history, returning every event.
fn given(commands: Vec<OrderCommand>) -> Vec<OrderEvent> {
    let mut order = Order::default();
    let mut events = Vec::new();
    for command in commands {
        for event in order.handle(command).expect("given commands are accepted") {
            order.apply(&event);
            events.push(event);
        }
    }
    events
}

/// When `command` is handled after `history`.
fn when(history: &[OrderEvent], command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
    Order::replay(history).handle(command)
}

fn created() -> Vec<OrderEvent> {
    given(vec![create(vec![
        line("A-1", 2, 1250),
        line("B-2", 1, 500),
    ])])
}

fn paid() -> Vec<OrderEvent> {
    given(vec![
        create(vec![line("A-1", 2, 1250), line("B-2", 1, 500)]),
        pay(3000),
    ])
}

fn shipped() -> Vec<OrderEvent> {
    given(vec![
        create(vec![line("A-1", 2, 1250), line("B-2", 1, 500)]),
        pay(3000),
        ship(),
    ])
}

#[test]
fn creating_an_order_records_lines_total_and_address() {
    let events = created();
    let [
        OrderEvent::Created {
            total_minor,
            currency,
            lines,
            shipping_address,
            ..
        },
    ] = events.as_slice()
    else {
        panic!("expected one Created event, got {events:?}");
    };
    assert_eq!(*total_minor, 3000);
    assert_eq!(currency.as_str(), "EUR");
    assert_eq!(lines.len(), 2);
    assert_eq!(
        shipping_address.as_ref().map(|a| a.country.as_str()),
        Some("GB")
    );
    let order = Order::replay(&events);
    assert_eq!(order.status, Some(OrderStatus::Created));
    assert_eq!(order.version, 1);
}

#[test]
fn an_order_cannot_be_created_twice() {
    assert_eq!(
        when(&created(), create(vec![line("A", 1, 1)])),
        Err(OrderError::AlreadyExists {
            status: OrderStatus::Created
        })
    );
}

#[test]
fn an_empty_order_is_refused() {
    assert_eq!(when(&[], create(vec![])), Err(OrderError::NoLines));
}

#[test]
fn too_many_lines_are_refused() {
    let lines = (0..=MAX_LINES)
        .map(|i| line(&format!("S{i}"), 1, 1))
        .collect();
    assert_eq!(when(&[], create(lines)), Err(OrderError::TooManyLines));
}

#[test]
fn the_largest_order_still_fits() {
    let lines = (0..MAX_LINES)
        .map(|i| line(&format!("S{i}"), i64::from(Quantity::MAX), UnitPrice::MAX))
        .collect::<Vec<_>>();
    assert!(total_minor(&lines).is_some());
}

#[test]
fn commands_on_a_missing_order_are_refused() {
    for command in [pay(1), ship(), OrderCommand::Deliver, cancel()] {
        assert_eq!(when(&[], command), Err(OrderError::NotFound));
    }
}

#[test]
fn paying_the_total_marks_the_order_paid() {
    let events = when(&created(), pay(3000)).expect("accepted");
    assert!(matches!(
        &events[..],
        [OrderEvent::Paid {
            amount_minor: 3000,
            ..
        }]
    ));
    let order = Order::replay(created().iter().chain(&events));
    assert_eq!(
        (order.status, order.paid_minor),
        (Some(OrderStatus::Paid), 3000)
    );
}

#[test]
fn paying_another_amount_is_refused() {
    assert_eq!(
        when(&created(), pay(2999)),
        Err(OrderError::AmountMismatch {
            expected: 3000,
            got: 2999
        })
    );
}

#[test]
fn an_order_is_paid_only_once() {
    assert_eq!(
        when(&paid(), pay(3000)),
        Err(OrderError::InvalidTransition {
            action: "pay",
            status: OrderStatus::Paid
        })
    );
}

#[test]
fn only_a_paid_order_ships_and_the_event_carries_everything() {
    assert_eq!(
        when(&created(), ship()),
        Err(OrderError::InvalidTransition {
            action: "ship",
            status: OrderStatus::Created
        })
    );
    let events = when(&paid(), ship()).expect("accepted");
    let [
        OrderEvent::Shipped {
            lines,
            total_minor,
            shipping_address,
            carrier,
            tracking_number,
            user_id,
            ..
        },
    ] = events.as_slice()
    else {
        panic!("expected Shipped, got {events:?}");
    };
    assert_eq!((lines.len(), *total_minor, *user_id), (2, 3000, USER));
    assert_eq!(
        (carrier.as_str(), tracking_number.as_str()),
        ("DHL", "JD014600")
    );
    assert_eq!(shipping_address, &address());
}

#[test]
fn an_order_without_an_address_cannot_ship() {
    let legacy = decode("order.created", 1, &fixture("order.created.v1.json")).expect("v1 loads");
    let mut order = Order::replay([&legacy]);
    order.apply(&OrderEvent::Paid {
        order_id: ORDER,
        user_id: USER,
        payment_reference: PaymentReference::parse("p").expect("ref"),
        amount_minor: 6499,
        currency: Currency::parse("EUR").expect("currency"),
    });
    assert_eq!(
        order.handle(ship()),
        Err(OrderError::NoShippingAddress {
            status: OrderStatus::Paid
        })
    );
}

#[test]
fn only_a_shipped_order_is_delivered() {
    assert_eq!(
        when(&paid(), OrderCommand::Deliver),
        Err(OrderError::InvalidTransition {
            action: "deliver",
            status: OrderStatus::Paid
        })
    );
    let events = when(&shipped(), OrderCommand::Deliver).expect("accepted");
    assert_eq!(
        events,
        [OrderEvent::Delivered {
            order_id: ORDER,
            user_id: USER
        }]
    );
}

#[test]
fn cancelling_before_shipping_refunds_what_was_paid() {
    let unpaid = when(&created(), cancel()).expect("accepted");
    assert!(matches!(
        &unpaid[..],
        [OrderEvent::Cancelled {
            refund_minor: 0,
            ..
        }]
    ));
    let refunded = when(&paid(), cancel()).expect("accepted");
    assert!(matches!(
        &refunded[..],
        [OrderEvent::Cancelled {
            refund_minor: 3000,
            ..
        }]
    ));
}

#[test]
fn shipped_delivered_or_cancelled_orders_cannot_be_cancelled() {
    let delivered = given(vec![
        create(vec![line("A", 1, 1)]),
        pay(1),
        ship(),
        OrderCommand::Deliver,
    ]);
    let cancelled = given(vec![create(vec![line("A", 1, 1)]), cancel()]);
    for (history, status) in [
        (shipped(), OrderStatus::Shipped),
        (delivered, OrderStatus::Delivered),
        (cancelled, OrderStatus::Cancelled),
    ] {
        assert_eq!(
            when(&history, cancel()),
            Err(OrderError::InvalidTransition {
                action: "cancel",
                status
            })
        );
    }
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
    assert_eq!(Currency::parse("XYZ"), Err(CurrencyError::Unknown));
    assert_eq!(
        Currency::parse("xau"),
        Err(CurrencyError::Unknown),
        "gold is not money here"
    );
    assert_eq!(
        Currency::parse(" jpy ").map(|c| c.as_str().to_owned()),
        Ok("JPY".to_owned())
    );
    let stored: Currency = serde_json::from_str("\"HRK\"").expect("history stays readable");
    assert_eq!(stored.as_str(), "HRK");
    assert_eq!(Currency::parse(""), Err(CurrencyError::Empty));
    assert_eq!(CountryCode::parse("GBR"), Err(TextError::NotCountryCode));
    assert_eq!(Carrier::parse(""), Err(TextError::Empty));
    assert_eq!(
        CancelReason::parse(&"x".repeat(501)),
        Err(TextError::TooLong(500))
    );
    assert_eq!(TrackingNumber::parse("a\u{0}b"), Err(TextError::Control));
}

#[test]
fn events_round_trip_through_json_at_their_schema_version() {
    for event in shipped()
        .into_iter()
        .chain(when(&paid(), cancel()).expect("cancel"))
    {
        let json = serde_json::to_value(&event).expect("serialize");
        let back = decode(event.event_type(), event.schema_version(), &json).expect("decode");
        assert_eq!(back, event);
    }
}

#[test]
fn stored_events_with_invalid_values_do_not_load() {
    let json = serde_json::json!({
        "type": "created", "order_id": ORDER, "user_id": USER,
        "currency": "EUR", "total_minor": 1, "shipping_address": null,
        "lines": [{"sku": "A", "quantity": 0, "unit_price": 1}]
    });
    assert!(matches!(
        decode("order.created", 2, &json),
        Err(DecodeError::Payload { .. })
    ));
    assert!(matches!(
        decode("order.created", 3, &json),
        Err(DecodeError::UnknownVersion { .. })
    ));
}

fn fixture(name: &str) -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/events")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// Every historical version of every event type has a fixture, and each one
/// still loads (upcast to the current version).
#[test]
fn every_stored_event_version_still_loads() {
    let mut versions = Vec::new();
    for entry in
        std::fs::read_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/events"))
            .expect("dir")
    {
        let name = entry
            .expect("entry")
            .file_name()
            .into_string()
            .expect("utf-8");
        let (stem, _) = name.rsplit_once(".json").expect("json file");
        let (event_type, version) = stem.rsplit_once(".v").expect("<type>.v<n>.json");
        let version: i32 = version.parse().expect("version number");
        let event =
            decode(event_type, version, &fixture(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(event.event_type(), event_type);
        versions.push((event_type.to_owned(), version));
    }
    for (event_type, current) in [
        ("order.created", CREATED_SCHEMA_VERSION),
        ("order.paid", 1),
        ("order.shipped", 1),
        ("order.delivered", 1),
        ("order.cancelled", 1),
    ] {
        for version in 1..=current {
            assert!(
                versions.contains(&(event_type.to_owned(), version)),
                "missing fixture {event_type}.v{version}.json"
            );
        }
    }
}

#[test]
fn a_v1_order_created_upcasts_without_an_address() {
    let event = decode("order.created", 1, &fixture("order.created.v1.json")).expect("loads");
    assert!(matches!(
        event,
        OrderEvent::Created {
            shipping_address: None,
            total_minor: 6499,
            ..
        }
    ));
}

fn arbitrary_command() -> impl Strategy<Value = OrderCommand> {
    prop_oneof![
        (1_usize..4, 0_i64..5).prop_map(|(n, price)| create(
            (0..n)
                .map(|i| line(&format!("S{i}"), 1 + i as i64, price))
                .collect()
        )),
        prop_oneof![Just(0_i64), 0_i64..40].prop_map(pay),
        Just(ship()),
        Just(OrderCommand::Deliver),
        Just(cancel()),
    ]
}

proptest! {
    /// Random command sequences: accepted commands only move along the
    /// lifecycle, state invariants hold after every step, and replaying the
    /// events gives the same state as applying them one by one.
    #[test]
    fn random_command_sequences_keep_the_invariants(commands in prop::collection::vec(arbitrary_command(), 0..20)) {
        let mut order = Order::default();
        let mut events = Vec::new();
        for command in commands {
            let before = order.status;
            match order.handle(command) {
                Ok(new) => {
                    prop_assert_eq!(new.len(), 1);
                    for event in new {
                        order.apply(&event);
                        events.push(event);
                    }
                    let allowed = matches!(
                        (before, order.status),
                        (None, Some(OrderStatus::Created))
                            | (Some(OrderStatus::Created), Some(OrderStatus::Paid | OrderStatus::Cancelled))
                            | (Some(OrderStatus::Paid), Some(OrderStatus::Shipped | OrderStatus::Cancelled))
                            | (Some(OrderStatus::Shipped), Some(OrderStatus::Delivered))
                    );
                    prop_assert!(allowed, "{:?} -> {:?}", before, order.status);
                }
                Err(_) => prop_assert_eq!(order.status, before),
            }
            prop_assert_eq!(order.version, events.len() as i64);
            prop_assert!(order.paid_minor == 0 || order.paid_minor == order.total_minor);
            prop_assert_eq!(order.total_minor, total_minor(&order.lines).unwrap_or(-1).max(0));
            if order.tracking_number.is_some() {
                prop_assert!(order.payment_reference.is_some(), "shipped implies paid");
                prop_assert!(order.cancel_reason.is_none(), "shipped orders are never cancelled");
            }
        }
        prop_assert_eq!(Order::replay(&events), order);
    }
}

#[test]
fn an_amount_is_never_negative() {
    assert_eq!(Amount::new(-1), Err(AmountError::Negative));
    assert_eq!(Amount::new(0).map(Amount::minor), Ok(0));
}

#[test]
fn an_idempotency_key_is_bounded_printable_text_and_empty_means_none() {
    assert_eq!(IdempotencyKey::parse(""), Ok(None));
    assert_eq!(
        IdempotencyKey::parse("k-1").map(|k| k.map(|k| k.as_str().to_owned())),
        Ok(Some("k-1".to_owned()))
    );
    assert_eq!(
        IdempotencyKey::parse(&"k".repeat(IdempotencyKey::MAX_LEN + 1)),
        Err(KeyError::TooLong)
    );
    assert_eq!(
        IdempotencyKey::parse("a\0b"),
        Err(KeyError::ControlCharacter)
    );
}

#[test]
fn an_order_stream_names_its_order_and_no_other_stream_does() {
    let id = Uuid::now_v7();
    let stream = es::stream_id::<Order>(id);
    assert_eq!(stream, format!("order-{id}"));
    assert_eq!(es::id_of_stream::<Order>(&stream), Some(id));
    assert_eq!(es::id_of_stream::<Order>(&format!("user-{id}")), None);
    assert_eq!(es::id_of_stream::<Order>(&format!("orders-{id}")), None);
    assert_eq!(es::id_of_stream::<Order>("order-not-a-uuid"), None);
}
