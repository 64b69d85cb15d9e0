//! Request and response framing checks: a message whose length or target two
//! parsers could read differently is refused before anything is forwarded.
//!
//! hyper's HTTP/1 parser already refuses, with 400 and a closed connection: several
//! differing `Content-Length`s, a `Content-Length` that is not a number, a
//! `Transfer-Encoding` whose last coding is not `chunked`, `Transfer-Encoding` in an
//! HTTP/1.0 request, invalid chunk sizes and chunk lines ended by a bare LF, obs-fold,
//! whitespace before the colon, bare CR, and NUL or other control characters in the
//! head. What it lets through is refused here and in [`super::guard`]:
//!
//! - `Content-Length` together with `Transfer-Encoding`: hyper uses the chunked framing
//!   and drops the length before the handler sees the head, so the guard (which reads
//!   the raw head) marks such requests; the check below stays as a second line should
//!   hyper ever pass both on;
//! - a `Transfer-Encoding` that is anything but exactly one `chunked` (`gzip, chunked`,
//!   `chunked, chunked`, or two fields), since the body is re-framed upstream and other
//!   codings would be lost;
//! - several `Host` fields, or a `Host` that disagrees with an absolute-form target's
//!   authority (or HTTP/2's `:authority`).
//!
//! Upstream responses carrying both `Content-Length` and `Transfer-Encoding` are not
//! passed on (502 `UPSTREAM_BAD_FRAMING`).

use http::header::{self, HeaderMap};
use http::{Uri, Version};

/// Why a request's framing was refused (`detail` of the answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `BAD_FRAMING`.
    Framing(&'static str),
    /// `BAD_HOST`.
    Host(&'static str),
}

/// A request's `Host` fields, looked up once for the check and the pipeline.
#[derive(Clone, Copy)]
pub struct HostFields<'a> {
    /// The first one.
    pub first: Option<&'a http::HeaderValue>,
    /// Whether there is more than one.
    pub several: bool,
}

impl<'a> HostFields<'a> {
    pub fn of(h: &'a HeaderMap) -> HostFields<'a> {
        let mut all = h.get_all(header::HOST).iter();
        let first = all.next();
        HostFields {
            first,
            several: all.next().is_some(),
        }
    }
}

/// Check a request head whose `Host` fields are `host`. `no_framing_fields`: the head
/// is known to carry no `Transfer-Encoding` (the lean HTTP/1 server hands such
/// heads to hyper), so the map is not searched for it.
pub fn check_request(
    uri: &Uri,
    version: Version,
    h: &HeaderMap,
    host: HostFields<'_>,
    no_framing_fields: bool,
) -> Result<(), Refusal> {
    if !no_framing_fields {
        check_transfer_encoding(h)?;
    }
    if host.several {
        return Err(Refusal::Host("several-host-fields"));
    }
    if let (Some(authority), Some(host)) = (uri.authority(), host.first) {
        let same = host
            .to_str()
            .is_ok_and(|h| h.trim().eq_ignore_ascii_case(authority.as_str()));
        if !same {
            return Err(Refusal::Host("host-differs-from-target"));
        }
    }
    // HTTP/1.1 requires a Host (RFC 9112 §3.2); an absolute-form target stands in.
    if version == Version::HTTP_11 && host.first.is_none() && uri.authority().is_none() {
        return Err(Refusal::Host("missing-host"));
    }
    Ok(())
}

fn check_transfer_encoding(h: &HeaderMap) -> Result<(), Refusal> {
    let mut te = h.get_all(header::TRANSFER_ENCODING).iter();
    let Some(first) = te.next() else {
        return Ok(());
    };
    if h.contains_key(header::CONTENT_LENGTH) {
        return Err(Refusal::Framing("content-length-with-transfer-encoding"));
    }
    let only_chunked = te.next().is_none()
        && first
            .to_str()
            .is_ok_and(|v| v.trim_matches([' ', '\t']).eq_ignore_ascii_case("chunked"));
    if !only_chunked {
        return Err(Refusal::Framing("transfer-encoding-not-chunked"));
    }
    Ok(())
}

/// Check an upstream response head; `Err` carries the detail.
pub fn check_response(h: &HeaderMap) -> Result<(), &'static str> {
    if h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH) {
        return Err("content-length-with-transfer-encoding");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn head(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in fields {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn check(target: &str, fields: &[(&str, &str)]) -> Result<(), Refusal> {
        let h = head(fields);
        check_request(
            &target.parse().unwrap(),
            Version::HTTP_11,
            &h,
            HostFields::of(&h),
            false,
        )
    }

    #[test]
    fn framing() {
        assert!(check("/", &[("host", "a"), ("transfer-encoding", "Chunked ")]).is_ok());
        assert!(check("/", &[("host", "a"), ("content-length", "3")]).is_ok());
        for te in [
            &[("transfer-encoding", "gzip, chunked")][..],
            &[("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")],
            &[("transfer-encoding", "chunked"), ("content-length", "3")],
        ] {
            let mut f = te.to_vec();
            f.push(("host", "a"));
            assert!(matches!(check("/", &f), Err(Refusal::Framing(_))), "{te:?}");
        }
    }

    #[test]
    fn hosts() {
        assert!(check("http://a.test/x", &[("host", "A.test")]).is_ok());
        assert_eq!(
            check("http://b.test/x", &[("host", "a.test")]),
            Err(Refusal::Host("host-differs-from-target"))
        );
        assert_eq!(
            check("/", &[("host", "a"), ("host", "b")]),
            Err(Refusal::Host("several-host-fields"))
        );
        assert_eq!(check("/", &[]), Err(Refusal::Host("missing-host")));
        assert!(check("http://a.test/", &[]).is_ok());
    }

    /// A head the lean server read (no framing fields) still has its Host checked.
    #[test]
    fn a_head_without_framing_fields_still_has_its_host_checked() {
        let lean = |target: &str, fields: &[(&str, &str)]| {
            let h = head(fields);
            check_request(&target.parse().unwrap(), Version::HTTP_11, &h, HostFields::of(&h), true)
        };
        assert!(lean("/", &[("host", "a")]).is_ok());
        assert_eq!(
            lean("/", &[("host", "a"), ("host", "b")]),
            Err(Refusal::Host("several-host-fields"))
        );
        assert_eq!(
            lean("http://b.test/", &[("host", "a.test")]),
            Err(Refusal::Host("host-differs-from-target"))
        );
        assert_eq!(lean("/", &[]), Err(Refusal::Host("missing-host")));
    }

    #[test]
    fn responses() {
        assert!(check_response(&head(&[("content-length", "1")])).is_ok());
        assert!(check_response(&head(&[("content-length", "1"), ("transfer-encoding", "chunked")])).is_err());
    }
}
