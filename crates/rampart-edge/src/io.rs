//! Stream wrappers that watch or prepend to the read side (`Prefixed`, `Guarded`,
//! a tunnel's `Activity`) pass every write straight through; this macro writes that
//! `AsyncWrite` impl once, vectored writes included.

/// `delegate_write!(Wrapper, field)`: `impl AsyncWrite for Wrapper<T>` by forwarding
/// to `self.field`.
macro_rules! delegate_write {
    ($wrapper:ident, $field:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<T> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.$field.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
            }
        }
    };
}

pub(crate) use delegate_write;

/// A client connection the lean HTTP/1 server ([`crate::h1server`]) can serve: a
/// stream that can also say, without reading, when a read may make progress.
pub(crate) trait Transport: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {
    /// Ready when a read would not wait: the socket is readable, or bytes read
    /// before are held in this layer. Registers `cx` with the socket otherwise.
    fn poll_readable(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>>;

    /// Whether closing says so in the stream before the socket closes (TLS's
    /// `close_notify`, sent by `shutdown`). A plain socket's close sends the FIN
    /// itself: a `shutdown` first would be a system call for nothing.
    const SHUTDOWN_BEFORE_CLOSE: bool = true;
}

impl Transport for tokio::net::TcpStream {
    fn poll_readable(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        self.poll_read_ready(cx)
    }

    const SHUTDOWN_BEFORE_CLOSE: bool = false;
}

impl<T: Transport> Transport for Box<T> {
    fn poll_readable(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        (**self).poll_readable(cx)
    }

    const SHUTDOWN_BEFORE_CLOSE: bool = T::SHUTDOWN_BEFORE_CLOSE;
}

impl<T: Transport> Transport for crate::security::proxy_protocol::Prefixed<T> {
    const SHUTDOWN_BEFORE_CLOSE: bool = T::SHUTDOWN_BEFORE_CLOSE;

    fn poll_readable(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        if self.has_prefix() {
            return std::task::Poll::Ready(Ok(()));
        }
        self.inner_mut().poll_readable(cx)
    }
}

impl<T: Transport> Transport for tokio_rustls::server::TlsStream<T> {
    fn poll_readable(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        let (io, tls) = self.get_mut();
        // Records read along with earlier ones are decrypted here; a closed or
        // failed session is reported by the read that follows.
        match tls.process_new_packets() {
            Ok(state) if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => io.poll_readable(cx),
            _ => std::task::Poll::Ready(Ok(())),
        }
    }
}
