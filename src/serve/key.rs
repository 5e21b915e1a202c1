//! What a keyed request becomes in the store: its key (hashed, so neither a
//! client's key nor its identity is stored or logged) and its fingerprint.

use std::sync::Arc;

use hyper::http::request::Parts;
use sha2::{Digest, Sha256};

use crate::event::{EventKey, Fingerprint};

/// The stored key of (scope, client, header value): `sha256:<hex>` of the client
/// and the key's bytes, each length-prefixed so that no two pairs collide. The
/// key's bytes are taken as sent, UTF-8 or not.
pub fn stored_key(scope: &Arc<str>, client: &[u8], key: &[u8]) -> EventKey {
    let mut h = Sha256::new();
    h.update((client.len() as u64).to_be_bytes());
    h.update(client);
    h.update((key.len() as u64).to_be_bytes());
    h.update(key);
    EventKey { scope: scope.clone(), id: format!("sha256:{}", hex(&h.finalize())).into_bytes() }
}

/// SHA-256 over the method, the path and query, the configured headers (their
/// values in order; an absent header differs from an empty one) and the body,
/// each length-prefixed; the store keeps its first 128 bits.
pub fn fingerprint(parts: &Parts, headers: &[String], body: &[u8]) -> Fingerprint {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    };
    field(parts.method.as_str().as_bytes());
    field(parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").as_bytes());
    for name in headers {
        field(name.as_bytes());
        let values: Vec<&[u8]> = parts.headers.get_all(name.as_str()).iter().map(|v| v.as_bytes()).collect();
        if values.is_empty() {
            field(b"\xff absent");
        }
        for v in values {
            field(v);
        }
    }
    field(body);
    let digest = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    Fingerprint(u128::from_be_bytes(first))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &[u8])]) -> Parts {
        let mut b = hyper::http::Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            b = b.header(*n, hyper::http::HeaderValue::from_bytes(v).unwrap());
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn keys_are_scoped_per_client_and_never_stored_in_clear() {
        let scope: Arc<str> = Arc::from("serve");
        let a = stored_key(&scope, b"alice", b"k1");
        assert_ne!(a, stored_key(&scope, b"bob", b"k1"));
        // Length prefixes: ("ab", "c") and ("a", "bc") differ.
        assert_ne!(stored_key(&scope, b"ab", b"c"), stored_key(&scope, b"a", b"bc"));
        assert_eq!(a, stored_key(&scope, b"alice", b"k1"));
        let id = String::from_utf8(a.id).unwrap();
        assert!(id.starts_with("sha256:") && !id.contains("k1") && id.len() == 71);
        // Bytes that are not UTF-8 are keys like any other.
        assert_ne!(stored_key(&scope, b"", b"\xff\xfe"), stored_key(&scope, b"", b"\xff\xfd"));
    }

    #[test]
    fn the_fingerprint_covers_method_path_query_headers_and_body() {
        let fp = |m, u, h: &[(&str, &[u8])], b: &[u8]| fingerprint(&parts(m, u, h), &["x-amount".into()], b);
        let base = fp("POST", "/pay?x=1", &[("x-amount", b"10")], b"{}");
        assert_eq!(base, fp("POST", "/pay?x=1", &[("x-amount", b"10"), ("x-other", b"1")], b"{}"));
        assert_ne!(base, fp("PATCH", "/pay?x=1", &[("x-amount", b"10")], b"{}"));
        assert_ne!(base, fp("POST", "/pay?x=2", &[("x-amount", b"10")], b"{}"));
        assert_ne!(base, fp("POST", "/pay?x=1", &[("x-amount", b"11")], b"{}"));
        assert_ne!(base, fp("POST", "/pay?x=1", &[], b"{}"));
        assert_ne!(base, fp("POST", "/pay?x=1", &[("x-amount", b"10")], b"{ }"));
    }
}
