//! Value types of an order line. Constructors parse; a value that exists is
//! valid.

use serde::{Deserialize, Serialize};

/// Why a line field was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("is required")]
    Empty,
    #[error("must be at most 64 characters of letters, digits, '-', '_', '.', '/'")]
    BadSku,
    #[error("must be between 1 and {max}", max = Quantity::MAX)]
    QuantityOutOfRange,
    #[error("must not be negative")]
    NegativePrice,
    #[error("must be at most {max}", max = UnitPrice::MAX)]
    PriceTooLarge,
}

/// A stock keeping unit: 1 to 64 characters of `[A-Za-z0-9-_./]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sku(String);

impl Sku {
    /// # Errors
    ///
    /// [`LineError::Empty`] or [`LineError::BadSku`].
    pub fn parse(raw: &str) -> Result<Self, LineError> {
        let sku = raw.trim();
        if sku.is_empty() {
            return Err(LineError::Empty);
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || "-_./".contains(c);
        if sku.len() > 64 || !sku.chars().all(allowed) {
            return Err(LineError::BadSku);
        }
        Ok(Self(sku.to_owned()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Sku {
    type Error = LineError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Sku> for String {
    fn from(value: Sku) -> Self {
        value.0
    }
}

/// How many units: 1 to [`Quantity::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Quantity(u32);

impl Quantity {
    pub const MAX: u32 = 10_000;

    /// # Errors
    ///
    /// [`LineError::QuantityOutOfRange`] unless `1 <= raw <= MAX`.
    pub fn new(raw: i64) -> Result<Self, LineError> {
        u32::try_from(raw)
            .ok()
            .filter(|q| (1..=Self::MAX).contains(q))
            .map(Self)
            .ok_or(LineError::QuantityOutOfRange)
    }

    #[must_use]
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<i64> for Quantity {
    type Error = LineError;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Quantity> for i64 {
    fn from(value: Quantity) -> Self {
        i64::from(value.0)
    }
}

/// Price of one unit in minor units (cents): 0 to [`UnitPrice::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct UnitPrice(i64);

impl UnitPrice {
    /// 10 billion major units: keeps `MAX * Quantity::MAX * lines` in an i64.
    pub const MAX: i64 = 1_000_000_000_000;

    /// # Errors
    ///
    /// [`LineError::NegativePrice`] or [`LineError::PriceTooLarge`].
    pub fn new(minor: i64) -> Result<Self, LineError> {
        if minor < 0 {
            Err(LineError::NegativePrice)
        } else if minor > Self::MAX {
            Err(LineError::PriceTooLarge)
        } else {
            Ok(Self(minor))
        }
    }

    #[must_use]
    pub fn minor(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for UnitPrice {
    type Error = LineError;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<UnitPrice> for i64 {
    fn from(value: UnitPrice) -> Self {
        value.0
    }
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: Sku,
    pub quantity: Quantity,
    /// In minor units of the order's currency.
    pub unit_price: UnitPrice,
}

/// The ISO 4217 codes of currencies in circulation (December 2026; funds,
/// precious metals and test codes excluded), sorted for binary search.
const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN",
    "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF",
    "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP",
    "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD",
    "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY",
    "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD",
    "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK",
    "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK",
    "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG",
    "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS",
    "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS", "VED",
    "VES", "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
];

/// An ISO 4217 currency code, stored upper-case. New orders must use a
/// currency in circulation; stored events keep whatever code they were
/// written with (a withdrawn currency does not make history unreadable).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency(String);

/// Why a currency code was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CurrencyError {
    #[error("is required")]
    Empty,
    #[error("must be a three-letter ISO 4217 code such as EUR")]
    Malformed,
    #[error("is not an ISO 4217 currency in circulation")]
    Unknown,
}

impl Currency {
    /// # Errors
    ///
    /// See [`CurrencyError`].
    pub fn parse(raw: &str) -> Result<Self, CurrencyError> {
        let currency = Self::shaped(raw)?;
        if ISO_4217.binary_search(&currency.as_str()).is_err() {
            return Err(CurrencyError::Unknown);
        }
        Ok(currency)
    }

    /// Three letters, any code: what stored events are read with.
    fn shaped(raw: &str) -> Result<Self, CurrencyError> {
        let code = raw.trim();
        if code.is_empty() {
            return Err(CurrencyError::Empty);
        }
        if code.len() != 3 || !code.chars().all(|c| c.is_ascii_alphabetic()) {
            return Err(CurrencyError::Malformed);
        }
        Ok(Self(code.to_ascii_uppercase()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Currency {
    type Error = CurrencyError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::shaped(&value)
    }
}

impl From<Currency> for String {
    fn from(value: Currency) -> Self {
        value.0
    }
}

impl std::fmt::Display for Currency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a free-text field was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("is required")]
    Empty,
    #[error("must be at most {0} characters")]
    TooLong(usize),
    #[error("must not contain control characters")]
    Control,
    #[error("must be a two-letter ISO 3166-1 country code")]
    NotCountryCode,
}

fn text(raw: &str, max: usize) -> Result<String, TextError> {
    let value = raw.trim();
    if value.is_empty() {
        Err(TextError::Empty)
    } else if value.chars().count() > max {
        Err(TextError::TooLong(max))
    } else if value.chars().any(char::is_control) {
        Err(TextError::Control)
    } else {
        Ok(value.to_owned())
    }
}

macro_rules! text_type {
    ($(#[$doc:meta])* $name:ident, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Most characters allowed.
            pub const MAX: usize = $max;

            /// Trims and checks the value.
            ///
            /// # Errors
            ///
            /// See [`TextError`].
            pub fn parse(raw: &str) -> Result<Self, TextError> {
                text(raw, Self::MAX).map(Self)
            }

            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = TextError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(&value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

text_type!(
    /// The payment provider's reference for a payment.
    PaymentReference,
    128
);
text_type!(
    /// Who carries a shipment, e.g. `DHL`.
    Carrier,
    64
);
text_type!(
    /// The carrier's tracking number.
    TrackingNumber,
    64
);
text_type!(
    /// Why an order was cancelled.
    CancelReason,
    500
);
text_type!(
    /// One line of a postal address, or a name, city, postal code.
    AddressLine,
    200
);

/// Where an order ships to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShippingAddress {
    pub name: AddressLine,
    pub line1: AddressLine,
    /// Second address line, if any.
    pub line2: Option<AddressLine>,
    pub city: AddressLine,
    pub postal_code: AddressLine,
    /// ISO 3166-1 alpha-2 country code, upper-case.
    pub country: CountryCode,
}

/// An ISO 3166-1 alpha-2 country code, stored upper-case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CountryCode(String);

impl CountryCode {
    /// # Errors
    ///
    /// [`TextError::Empty`], or [`TextError::NotCountryCode`] for anything but two letters.
    pub fn parse(raw: &str) -> Result<Self, TextError> {
        let code = raw.trim();
        if code.is_empty() {
            return Err(TextError::Empty);
        }
        if code.len() != 2 || !code.chars().all(|c| c.is_ascii_alphabetic()) {
            return Err(TextError::NotCountryCode);
        }
        Ok(Self(code.to_ascii_uppercase()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CountryCode {
    type Error = TextError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<CountryCode> for String {
    fn from(value: CountryCode) -> Self {
        value.0
    }
}
