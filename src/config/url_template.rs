//! A URL with `{topic}`, `{partition}` and `{header.NAME}` placeholders: `[sink.http] url`.
//! Parsed once, when the config is validated (the config keeps the parsed template and
//! the HTTP sink fills it per record). A leaf: it imports nothing from the crate.

/// A URL with `{topic}`, `{partition}` and `{header.NAME}` placeholders.
#[derive(Clone, PartialEq, Eq)]
pub struct UrlTemplate(Vec<Part>);

/// Never the URL's text: it may hold a token (the config's own `Debug` shows it redacted).
impl std::fmt::Debug for UrlTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlTemplate(<redacted>)")
    }
}

#[derive(Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Topic,
    Partition,
    Header(String),
}

impl UrlTemplate {
    /// Parses a template; the error says which placeholder is unknown or unclosed.
    pub fn parse(template: &str) -> Result<UrlTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                // Not the rest of the URL: it may hold a token.
                return Err("has an unclosed `{`".to_string());
            };
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "topic" => Part::Topic,
                "partition" => Part::Partition,
                _ => match name.strip_prefix("header.") {
                    Some(h) if !h.is_empty() => Part::Header(h.to_string()),
                    _ => {
                        return Err(format!(
                            "uses `{{{name}}}`; allowed placeholders: {{topic}}, {{partition}}, {{header.NAME}}"
                        ))
                    }
                },
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(UrlTemplate(parts))
    }

    /// The URL for a record of `topic` and `partition` with these headers, placeholders
    /// percent-encoded; the error is a dead letter's reason.
    pub fn fill(&self, topic: &str, partition: i32, headers: &[(String, Option<Vec<u8>>)]) -> Result<String, String> {
        let mut url = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => url.push_str(t),
                Part::Topic => percent_encode(topic.as_bytes(), &mut url),
                Part::Partition => url.push_str(&partition.to_string()),
                Part::Header(name) => {
                    let value = headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref());
                    let Some(value) = value else {
                        return Err(format!("the URL template uses header `{name}`, which the record does not carry"));
                    };
                    if std::str::from_utf8(value).is_err() {
                        return Err(format!(
                            "the URL template uses header `{name}`, whose value is not UTF-8 ({} bytes)",
                            value.len()
                        ));
                    }
                    percent_encode(value, &mut url);
                }
            }
        }
        Ok(url)
    }
}

/// Everything but RFC 3986's unreserved characters becomes `%XX`.
fn percent_encode(bytes: &[u8], out: &mut String) {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: Vec<(&str, Option<&[u8]>)>) -> Vec<(String, Option<Vec<u8>>)> {
        pairs.into_iter().map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec))).collect()
    }

    #[test]
    fn templates_fill_topic_partition_and_headers_percent_encoded() {
        let t = UrlTemplate::parse("http://h/{topic}/{partition}/c/{header.customer}?x=1").unwrap();
        let h = headers(vec![("customer", Some("cus 1/ä".as_bytes()))]);
        assert_eq!(t.fill("in put", 3, &h).unwrap(), "http://h/in%20put/3/c/cus%201%2F%C3%A4?x=1");
    }

    #[test]
    fn templates_refuse_unknown_placeholders_and_hostile_headers_with_reasons() {
        assert!(UrlTemplate::parse("http://h/{event}").unwrap_err().contains("{event}"));
        assert!(UrlTemplate::parse("http://h/{topic").unwrap_err().contains("unclosed"));
        let t = UrlTemplate::parse("http://h/{header.customer}").unwrap();
        let missing = t.fill("in put", 3, &headers(vec![])).unwrap_err();
        assert!(missing.contains("does not carry"), "{missing}");
        let null = t.fill("in put", 3, &headers(vec![("customer", None)])).unwrap_err();
        assert!(null.contains("does not carry"), "{null}");
        let binary = t.fill("in put", 3, &headers(vec![("customer", Some(&[0xff, 0xfe]))])).unwrap_err();
        assert!(binary.contains("not UTF-8"), "{binary}");
    }

    #[test]
    fn debug_output_never_shows_the_url() {
        let t = UrlTemplate::parse("https://user:s3cret@h/{topic}?token=abc").unwrap();
        let shown = format!("{t:?}");
        assert!(!shown.contains("s3cret") && !shown.contains("abc"), "{shown}");
    }
}
