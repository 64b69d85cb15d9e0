//! The PROXY protocol (v1 text and v2 binary, parsed by the `ppp` crate), opt-in per
//! listener: a load balancer in front tells us the client's address before the
//! first HTTP (or TLS) byte.
//!
//! On a listener in `server.proxy_protocol`, every connection must start with a
//! header, and only peers in `server.trusted_proxies` may send one: anything else
//! closes the connection. `LOCAL` (v2) and `UNKNOWN` (v1) headers keep the socket
//! peer as the client, as the specification says.

use ppp::{HeaderResult, PartialResult, v1, v2};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// The largest header read: v1 is at most 107 bytes; v2 at most 16 + 65,535, but
/// with addresses and the usual TLVs it fits in 536 (what HAProxy reads).
const MAX_HEADER: usize = 536;

/// Read and parse the header at the start of `io`. Returns the client address it
/// carries (`None` for LOCAL/UNKNOWN) and the bytes read past it.
pub async fn read_header<T: AsyncRead + Unpin>(io: &mut T) -> Result<(Option<SocketAddr>, Vec<u8>), &'static str> {
    let mut buf = vec![0u8; MAX_HEADER];
    let mut len = 0;
    loop {
        let n = io.read(&mut buf[len..]).await.map_err(|_| "read failed")?;
        if n == 0 {
            return Err("connection closed before the PROXY header ended");
        }
        len += n;
        let parsed = HeaderResult::parse(&buf[..len]);
        if parsed.is_incomplete() {
            if len == MAX_HEADER {
                return Err("PROXY header too long");
            }
            continue;
        }
        let (used, source) = match parsed {
            HeaderResult::V1(Ok(h)) => (
                h.header.len(),
                match h.addresses {
                    v1::Addresses::Tcp4(a) => Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
                    v1::Addresses::Tcp6(a) => Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
                    v1::Addresses::Unknown => None,
                },
            ),
            HeaderResult::V2(Ok(h)) => (
                h.len(),
                match (h.command, h.addresses) {
                    (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                        Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                    }
                    (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                        Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                    }
                    _ => None,
                },
            ),
            HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => return Err("invalid PROXY header"),
        };
        let rest = buf.get(used..len).map(<[u8]>::to_vec).unwrap_or_default();
        return Ok((source, rest));
    }
}

/// A stream that first yields bytes already read from it.
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    pos: usize,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(inner: T, prefix: Vec<u8>) -> Prefixed<T> {
        Prefixed { prefix, pos: 0, inner }
    }

    /// The stream and the prefix bytes not yet read.
    pub fn into_parts(mut self) -> (T, Vec<u8>) {
        let rest = self.prefix.split_off(self.pos.min(self.prefix.len()));
        (self.inner, rest)
    }

    /// Bytes of the prefix are still to be read.
    pub fn has_prefix(&self) -> bool {
        self.pos < self.prefix.len()
    }

    pub fn inner_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

crate::io::delegate_write!(Prefixed, inner);

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> Result<(Option<SocketAddr>, Vec<u8>), &'static str> {
        let mut r = bytes;
        read_header(&mut r).await
    }

    #[tokio::test]
    async fn v1_and_v2() {
        let (src, rest) = parse(b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 80\r\nGET / HTTP/1.1\r\n")
            .await
            .unwrap();
        assert_eq!(src, Some("192.0.2.7:5555".parse().unwrap()));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let (src, _) = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n").await.unwrap();
        assert_eq!(src, Some("[2001:db8::1]:1".parse().unwrap()));
        assert_eq!(parse(b"PROXY UNKNOWN\r\nX").await.unwrap(), (None, b"X".to_vec()));

        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 12, 198, 51, 100, 9, 10, 0, 0, 1, 0x1f, 0x90, 0, 80]);
        v2.extend_from_slice(b"GET");
        let (src, rest) = parse(&v2).await.unwrap();
        assert_eq!(src, Some("198.51.100.9:8080".parse().unwrap()));
        assert_eq!(rest, b"GET");
        // LOCAL: the socket peer stays the client.
        let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local).await.unwrap(), (None, Vec::new()));
    }

    #[tokio::test]
    async fn refusals() {
        assert!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.is_err());
        assert!(parse(b"PROXY TCP4 999.0.0.1 10.0.0.1 1 2\r\n").await.is_err());
        assert!(parse(b"PROXY TCP4 192.0.2.7").await.is_err(), "closed before the end");
        assert!(parse(&[b'P'; 600]).await.is_err());
    }
}
