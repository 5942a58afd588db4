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

/// An ISO 4217-shaped currency code: three letters, stored upper-case.
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
}

impl Currency {
    /// # Errors
    ///
    /// See [`CurrencyError`].
    pub fn parse(raw: &str) -> Result<Self, CurrencyError> {
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
        Self::parse(&value)
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
