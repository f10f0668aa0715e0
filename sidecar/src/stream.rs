//! The byte streams the proxy carries to its peers: plain TCP, or mTLS to a peer sidecar. Its own
//! module so that the HTTP/2 hop (`http::peer`) and the pools (`upstream`) can both use it without
//! depending on each other.

use tokio::net::TcpStream;

/// An opaque upstream stream.
#[derive(Debug)]
pub enum TcpOrTls {
    /// Plaintext.
    Tcp(TcpStream),
    /// mTLS to a peer sidecar.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl TcpOrTls {
    /// Copies both ways between `downstream` and this stream until either side closes.
    pub async fn splice<D>(mut self, downstream: &mut D) -> std::io::Result<(u64, u64)>
    where
        D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        tokio::io::copy_bidirectional(downstream, &mut self).await
    }
}

impl tokio::io::AsyncRead for TcpOrTls {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            TcpOrTls::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            TcpOrTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for TcpOrTls {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            TcpOrTls::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            TcpOrTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    // Forwarded so that h2 hands over a frame head and its payload in one call (one TLS record
    // and one send instead of two); see `telemetry::Counted`.
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            TcpOrTls::Tcp(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            TcpOrTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            TcpOrTls::Tcp(s) => s.is_write_vectored(),
            TcpOrTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            TcpOrTls::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            TcpOrTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            TcpOrTls::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            TcpOrTls::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
