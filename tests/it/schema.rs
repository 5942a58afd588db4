//! Every message the relays publish is checked against its `shop.events.v1`
//! schema, independently of the Rust types that wrote it: the bytes are
//! walked with the descriptors compiled from `proto/` (field numbers, wire
//! types, nested messages, UTF-8), the subject names the message type as
//! `events.proto` documents it, and the metadata agrees with the headers.
//! Golden fixtures pin what each stored event version is published as.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use prost::Message as _;
use prost_types::{
    DescriptorProto, FileDescriptorSet,
    field_descriptor_proto::{Label, Type},
};

/// Messages of the embedded descriptor set, by full name (`.shop.events.v1.OrderCreated`).
fn messages() -> BTreeMap<String, DescriptorProto> {
    fn collect(
        prefix: &str,
        message: &DescriptorProto,
        out: &mut BTreeMap<String, DescriptorProto>,
    ) {
        let name = format!("{prefix}.{}", message.name());
        for nested in &message.nested_type {
            collect(&name, nested, out);
        }
        out.insert(name, message.clone());
    }
    let set = FileDescriptorSet::decode(contracts::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let mut out = BTreeMap::new();
    for file in &set.file {
        let prefix = if file.package().is_empty() {
            String::new()
        } else {
            format!(".{}", file.package())
        };
        for message in &file.message_type {
            collect(&prefix, message, &mut out);
        }
    }
    out
}

fn varint(bytes: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first().ok_or("truncated varint")?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint longer than 10 bytes".to_owned())
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if bytes.len() < n {
        return Err(format!("needs {n} bytes, {} left", bytes.len()));
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

/// Walks `bytes` as the message `name`; returns the names of the fields present.
fn validate(
    all: &BTreeMap<String, DescriptorProto>,
    name: &str,
    mut bytes: &[u8],
) -> Result<Vec<String>, String> {
    let message = all
        .get(name)
        .ok_or_else(|| format!("{name} is not in the schema"))?;
    let mut present = Vec::new();
    while !bytes.is_empty() {
        let tag = varint(&mut bytes)?;
        let (number, wire) = (tag >> 3, tag & 7);
        let field = message
            .field
            .iter()
            .find(|f| u64::try_from(f.number()).is_ok_and(|n| n == number))
            .ok_or_else(|| format!("{name}: field {number} is not in the schema"))?;
        let kind = field.r#type();
        let expected = match kind {
            Type::Int32
            | Type::Int64
            | Type::Uint32
            | Type::Uint64
            | Type::Sint32
            | Type::Sint64
            | Type::Bool
            | Type::Enum => 0,
            Type::Fixed64 | Type::Sfixed64 | Type::Double => 1,
            Type::String | Type::Bytes | Type::Message | Type::Group => 2,
            Type::Fixed32 | Type::Sfixed32 | Type::Float => 5,
        };
        let packed = wire == 2 && field.label() == Label::Repeated && expected != 2;
        if wire != expected && !packed {
            return Err(format!(
                "{name}.{}: wire type {wire}, the schema says {expected}",
                field.name()
            ));
        }
        match wire {
            0 => {
                varint(&mut bytes)?;
            }
            1 => {
                take(&mut bytes, 8)?;
            }
            5 => {
                take(&mut bytes, 4)?;
            }
            2 => {
                let len = usize::try_from(varint(&mut bytes)?).map_err(|e| e.to_string())?;
                let body = take(&mut bytes, len)?;
                match kind {
                    Type::String => {
                        std::str::from_utf8(body)
                            .map_err(|_| format!("{name}.{}: not UTF-8", field.name()))?;
                    }
                    Type::Message => {
                        validate(all, field.type_name(), body)
                            .map_err(|e| format!("{name}.{}: {e}", field.name()))?;
                    }
                    _ => {}
                }
            }
            other => return Err(format!("{name}: wire type {other} is not used by proto3")),
        }
        present.push(field.name().to_owned());
    }
    Ok(present)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Subject -> message type, as `events.proto` documents each message
/// ("// Subject `order.created`." right above `message OrderCreated`).
fn subjects() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(root().join("proto/shop/events/v1/events.proto"))
        .expect("events.proto");
    let mut out = BTreeMap::new();
    let mut pending = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("// Subject `") {
            pending = rest.split('`').next().map(str::to_owned);
        } else if let Some(rest) = line.strip_prefix("message ") {
            if let Some(subject) = pending.take() {
                let name = rest.trim_end_matches('{').trim();
                out.insert(subject, format!(".shop.events.v1.{name}"));
            }
        } else if !line.starts_with("//") {
            pending = None;
        }
    }
    out
}

#[test]
fn the_validator_refuses_what_the_schema_does_not_allow() {
    let all = messages();
    let good = contracts::events::v1::OrderPaid {
        metadata: None,
        order_id: "o".to_owned(),
        user_id: "u".to_owned(),
        amount_minor: 5,
        currency: "EUR".to_owned(),
        payment_reference: "p".to_owned(),
    }
    .encode_to_vec();
    validate(&all, ".shop.events.v1.OrderPaid", &good).expect("valid");
    let unknown_field = [good, vec![0xf8, 0x01, 0x01]].concat(); // field 31, varint
    assert!(validate(&all, ".shop.events.v1.OrderPaid", &unknown_field).is_err());
    // Field 2 (order_id, a string) holding bytes that are not UTF-8.
    let bad_utf8 = [vec![0x12, 0x02], vec![0xff, 0xfe]].concat();
    assert!(validate(&all, ".shop.events.v1.OrderPaid", &bad_utf8).is_err());
    let wrong_wire = [0x10, 0x01]; // field 2 (a string) as a varint
    assert!(validate(&all, ".shop.events.v1.OrderPaid", &wrong_wire).is_err());
    // A length past the end of the message.
    assert!(validate(&all, ".shop.events.v1.OrderPaid", &[0x12, 0x05, b'a']).is_err());
}

/// A full lifecycle on the real stack; every message in JetStream is valid
/// for its subject's schema and carries metadata matching its headers.
#[tokio::test]
async fn every_published_message_matches_its_schema_and_headers() -> anyhow::Result<()> {
    use contracts::order::v1::{
        CancelOrderRequest, DeliverOrderRequest, PayOrderRequest, ShipOrderRequest,
    };
    use testkit::bearer;
    let stack = testkit::TestStack::start().await?;
    let (_, token) = stack.signed_up_user().await?;
    let mut orders = stack.orders().await?;
    let order = |n| crate::helpers::order(vec![crate::helpers::item("SKU-1", n, 100)]);
    let kept = orders
        .create_order(bearer(&token, order(2)))
        .await?
        .into_inner()
        .order
        .expect("order");
    orders
        .pay_order(bearer(
            &token,
            PayOrderRequest {
                order_id: kept.id.clone(),
                payment_reference: "pay-1".to_owned(),
                amount_minor: 200,
                ..Default::default()
            },
        ))
        .await?;
    orders
        .ship_order(bearer(
            &token,
            ShipOrderRequest {
                order_id: kept.id.clone(),
                carrier: "DHL".to_owned(),
                tracking_number: "JD1".to_owned(),
                ..Default::default()
            },
        ))
        .await?;
    orders
        .deliver_order(bearer(
            &token,
            DeliverOrderRequest {
                order_id: kept.id.clone(),
                ..Default::default()
            },
        ))
        .await?;
    let dropped = orders
        .create_order(bearer(&token, order(1)))
        .await?
        .into_inner()
        .order
        .expect("order");
    orders
        .cancel_order(bearer(
            &token,
            CancelOrderRequest {
                order_id: dropped.id,
                reason: "changed my mind".to_owned(),
                ..Default::default()
            },
        ))
        .await?;

    let js = async_nats::jetstream::new(async_nats::connect(stack.nats.url()).await?);
    let all = messages();
    let subjects = subjects();
    let mut seen = std::collections::BTreeSet::new();
    for (stream, expected) in [("USERS", 1), ("ORDERS", 6)] {
        let mut stream = js.get_stream(stream).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while stream.info().await?.state.messages < expected {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "relay too slow");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let last = stream.info().await?.state.last_sequence;
        for sequence in 1..=last {
            let raw = stream.get_raw_message(sequence).await?;
            let subject = raw.subject.to_string();
            let name = subjects.get(&subject).ok_or_else(|| {
                anyhow::anyhow!("subject {subject} is not documented in events.proto")
            })?;
            let present = validate(&all, name, &raw.payload)
                .map_err(|e| anyhow::anyhow!("{subject}: {e}"))?;
            anyhow::ensure!(
                present.contains(&"metadata".to_owned()),
                "{subject}: no metadata"
            );
            // Every event message has EventMetadata as field 1.
            let metadata = contracts::events::v1::OrderDelivered::decode(raw.payload.as_ref())?
                .metadata
                .expect("metadata");
            let header = |key: &str| raw.headers.get(key).map(|v| v.to_string());
            anyhow::ensure!(
                header(async_nats::header::NATS_MESSAGE_ID.as_ref())
                    == Some(metadata.event_id.clone()),
                "{subject}: Nats-Msg-Id is the event id"
            );
            anyhow::ensure!(
                header(messaging::headers::STREAM_ID) == Some(metadata.stream_id.clone())
            );
            anyhow::ensure!(
                header(messaging::headers::STREAM_VERSION)
                    == Some(metadata.stream_version.to_string())
            );
            anyhow::ensure!(header(messaging::headers::EVENT_TYPE) == Some(subject.clone()));
            anyhow::ensure!(
                metadata.occurred_at.is_some()
                    && uuid::Uuid::parse_str(&metadata.correlation_id).is_ok()
            );
            seen.insert(subject);
        }
    }
    let documented: std::collections::BTreeSet<String> = subjects.keys().cloned().collect();
    assert_eq!(
        seen, documented,
        "every documented subject was published and checked"
    );
    stack.stop().await;
    Ok(())
}

/// Each stored event version (the fixtures the upcasters are tested with)
/// is published as its golden file says (`tests/it/golden/published/`);
/// `SHOP_UPDATE_GOLDEN=1` rewrites them after a deliberate change.
#[test]
fn each_stored_event_version_is_published_as_its_golden_fixture() {
    use es_postgres::IntegrationMapper as _;
    let all = messages();
    let subjects = subjects();
    let golden_dir = root().join("tests/it/golden/published");
    let update = std::env::var("SHOP_UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let mut checked = 0;
    for dir in [
        "services/order/domain/fixtures/events",
        "services/user/domain/fixtures/events",
    ] {
        let mut files: Vec<_> = std::fs::read_dir(root().join(dir))
            .expect("fixtures")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        for path in files {
            let file = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("name")
                .to_owned();
            let (event_type, version) = file
                .trim_end_matches(".json")
                .rsplit_once(".v")
                .expect("<type>.v<n>.json");
            let payload: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
            let stream_id = if event_type.starts_with("user.") {
                "user-01a212c0-a793-7340-ac08-36100d5303fe"
            } else {
                "order-01a212c0-a80b-72bd-8946-7bef10ad62fb"
            };
            let event = es::RecordedEvent {
                position: 7,
                event_id: uuid::Uuid::from_u128(0x0123_4567_89ab_7def_8123_4567_89ab_cdef),
                stream_id: stream_id.to_owned(),
                version: 3,
                event_type: event_type.to_owned(),
                schema_version: version.parse().expect("version"),
                payload,
                occurred_at: chrono::DateTime::from_timestamp(1_764_633_600, 0).expect("time"),
                context: es::EventContext {
                    correlation_id: uuid::Uuid::from_u128(1),
                    causation_id: uuid::Uuid::from_u128(2),
                    actor: "01a212c0-a793-7340-ac08-36100d5303fe".to_owned(),
                    traceparent: None,
                },
            };
            let message = if event_type.starts_with("user.") {
                user_service::integration::UserEvents.map(&event)
            } else {
                order_service::integration::OrderEvents.map(&event)
            }
            .unwrap_or_else(|e| panic!("{file}: {e:?}"))
            .expect("published");
            assert_eq!(message.subject, event_type);
            let name = &subjects[event_type];
            validate(&all, name, &message.payload).unwrap_or_else(|e| panic!("{file}: {e}"));
            let rendered = render(event_type, &message.payload);
            let golden = golden_dir.join(file.replace(".json", ".txt"));
            if update {
                std::fs::create_dir_all(&golden_dir).expect("dir");
                std::fs::write(&golden, &rendered).expect("write golden");
            }
            let expected = std::fs::read_to_string(&golden).unwrap_or_else(|e| {
                panic!("{}: {e} (SHOP_UPDATE_GOLDEN=1 writes it)", golden.display())
            });
            assert_eq!(
                rendered,
                expected,
                "{file} is published differently than {}",
                golden.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 7, "{checked} fixtures");
}

fn render(event_type: &str, payload: &[u8]) -> String {
    use contracts::events::v1 as pb;
    let text = match event_type {
        "user.created" => format!("{:#?}", pb::UserCreated::decode(payload)),
        "order.created" => format!("{:#?}", pb::OrderCreated::decode(payload)),
        "order.paid" => format!("{:#?}", pb::OrderPaid::decode(payload)),
        "order.shipped" => format!("{:#?}", pb::OrderShipped::decode(payload)),
        "order.delivered" => format!("{:#?}", pb::OrderDelivered::decode(payload)),
        "order.cancelled" => format!("{:#?}", pb::OrderCancelled::decode(payload)),
        other => panic!("no renderer for {other}"),
    };
    text + "\n"
}
