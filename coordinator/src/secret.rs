//! Comparing secrets (the API token, the purge listener's shared secret) without leaking,
//! through timing, where a guess first differs.

/// True when `a == b`, in time that depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn equal_only_when_equal() {
        assert!(super::constant_time_eq(b"token", b"token"));
        assert!(!super::constant_time_eq(b"token", b"tokem"));
        assert!(!super::constant_time_eq(b"token", b"token2"));
    }
}
