//! Order lines and shipping addresses on the wire.
//!
//! `shop.order.v1` (the API) and `shop.events.v1` (the integration events)
//! each define these two shapes, field for field the same; both packages
//! were released in 0.1.0, so a shared `shop.common.v1` waits for their next
//! major versions (ADR 14). Until then the mapping from the domain is
//! written once, here, and stamped out for both packages.

use order_domain::{OrderLine, ShippingAddress};

macro_rules! shapes {
    ($package:ident, $line:ident) => {
        /// The domain's lines and address as this package spells them.
        pub mod $package {
            use contracts::$package::v1 as pb;

            use super::{OrderLine, ShippingAddress};

            /// Order lines, in order.
            #[must_use]
            pub fn lines(lines: &[OrderLine]) -> Vec<pb::$line> {
                lines
                    .iter()
                    .map(|line| pb::$line {
                        sku: line.sku.as_str().to_owned(),
                        quantity: i32::try_from(line.quantity.get()).unwrap_or(i32::MAX),
                        unit_price_minor: line.unit_price.minor(),
                    })
                    .collect()
            }

            /// A shipping address; an absent second line is the empty string.
            #[must_use]
            pub fn address(address: &ShippingAddress) -> pb::ShippingAddress {
                pb::ShippingAddress {
                    name: address.name.to_string(),
                    line1: address.line1.to_string(),
                    line2: address
                        .line2
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    city: address.city.to_string(),
                    postal_code: address.postal_code.to_string(),
                    country: address.country.as_str().to_owned(),
                }
            }
        }
    };
}

shapes!(order, OrderItem);
shapes!(events, OrderLine);
