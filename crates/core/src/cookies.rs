//! Reading a cookie from a request's `Cookie` fields (RFC 6265 §5.4),
//! shared by the runtime's session extractor and the gateway's identity
//! check, which hold their headers in `http` maps of their own.

/// The value of cookie `name` in `fields` (the values of every `Cookie`
/// field of a request), unquoted; the first one wins.
pub fn value<'a>(fields: impl IntoIterator<Item = &'a str>, name: &str) -> Option<&'a str> {
    fields
        .into_iter()
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use super::value;

    #[test]
    fn the_named_cookie_is_found_in_any_field() {
        let fields = ["a=1; shoal_session=abc", "b=2"];
        assert_eq!(value(fields, "shoal_session"), Some("abc"));
        assert_eq!(value(fields, "b"), Some("2"));
        assert_eq!(value(fields, "shoal"), None);
        assert_eq!(value(["x=\"quoted\""], "x"), Some("quoted"));
    }
}
