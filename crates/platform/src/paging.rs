//! Cursor pagination shared by every list RPC: `page_size` (0 = default,
//! 1..=100) and an opaque `page_token` that is the last row's key.

use crate::status::FieldViolations;

/// Rows per page when the caller does not say.
pub const DEFAULT_PAGE_SIZE: i64 = 20;
/// Most rows per page.
pub const MAX_PAGE_SIZE: i32 = 100;

/// A parsed page request: how many rows, and the key to continue after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page<K> {
    pub size: i64,
    pub after: Option<K>,
}

impl<K> Page<K> {
    /// How many rows to fetch: one more than the page, to know whether
    /// another page follows.
    #[must_use]
    pub fn fetch_limit(&self) -> i64 {
        self.size + 1
    }

    /// Cuts fetched rows to the page and gives the next token (empty when
    /// this was the last page).
    #[must_use]
    pub fn finish<T>(&self, mut rows: Vec<T>, key: impl Fn(&T) -> String) -> (Vec<T>, String) {
        let size = usize::try_from(self.size).unwrap_or(usize::MAX);
        let more = rows.len() > size;
        rows.truncate(size);
        let token = match rows.last() {
            Some(last) if more => key(last),
            _ => String::new(),
        };
        (rows, token)
    }
}

/// Parses `page_size` and `page_token`, recording a violation per bad field.
#[must_use]
pub fn parse<K: std::str::FromStr>(
    violations: &mut FieldViolations,
    page_size: i32,
    page_token: &str,
) -> Option<Page<K>> {
    let size = match page_size {
        0 => Some(DEFAULT_PAGE_SIZE),
        n @ 1..=MAX_PAGE_SIZE => Some(i64::from(n)),
        _ => {
            violations.add(
                "page_size",
                format!("must be between 1 and {MAX_PAGE_SIZE}"),
            );
            None
        }
    };
    let after = if page_token.is_empty() {
        Some(None)
    } else {
        violations.check(
            "page_token",
            page_token
                .parse::<K>()
                .map(Some)
                .map_err(|_| "is not a token this service issued"),
        )
    };
    Some(Page {
        size: size?,
        after: after?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Untrusted page requests: any size and token either parse into a
        /// bounded page or name the bad field; nothing panics.
        #[test]
        fn any_page_request_is_a_bounded_page_or_a_named_violation(
            size in proptest::prelude::any::<i32>(),
            token in "\\PC{0,64}",
        ) {
            let mut violations = FieldViolations::new();
            match parse::<uuid::Uuid>(&mut violations, size, &token) {
                Some(page) => {
                    proptest::prop_assert!((1..=i64::from(MAX_PAGE_SIZE)).contains(&page.size));
                    proptest::prop_assert!(violations.is_empty());
                    proptest::prop_assert_eq!(page.after.is_some(), !token.is_empty());
                }
                None => proptest::prop_assert!(!violations.is_empty()),
            }
        }
    }
}
