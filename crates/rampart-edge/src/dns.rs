//! Asynchronous DNS for upstream hosts, with refresh.
//!
//! Backend names are resolved by hickory-resolver (configured from
//! `/etc/resolv.conf`, `/etc/hosts` first) on each new upstream connection. Answers are
//! cached for their TTL (capped at 5 minutes, negative answers at 10 s), so a changed
//! record is picked up when its TTL runs out, without a reload. Pooled connections
//! keep the address they connected to until they close. IP literals never reach
//! the resolver (hyper-util's connector parses them first).

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ResolveHosts, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hyper_util::client::legacy::connect::dns::Name;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

#[derive(Clone)]
pub struct Resolver {
    inner: Arc<TokioResolver>,
}

impl Resolver {
    /// The process-wide resolver (one cache shared by every pool).
    pub fn shared() -> Resolver {
        static SHARED: OnceLock<Resolver> = OnceLock::new();
        SHARED.get_or_init(Resolver::from_system).clone()
    }

    fn from_system() -> Resolver {
        let mut builder = match TokioResolver::builder_tokio() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the system resolver configuration; using defaults");
                TokioResolver::builder_with_config(ResolverConfig::default(), TokioConnectionProvider::default())
            }
        };
        let o = builder.options_mut();
        o.timeout = Duration::from_secs(2);
        o.attempts = 2;
        o.cache_size = 4096;
        o.use_hosts_file = ResolveHosts::Always;
        o.positive_max_ttl = Some(Duration::from_secs(300));
        o.negative_max_ttl = Some(Duration::from_secs(10));
        Resolver {
            inner: Arc::new(builder.build()),
        }
    }
}

type Addrs = std::vec::IntoIter<SocketAddr>;

impl tower_service::Service<Name> for Resolver {
    type Response = Addrs;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Addrs, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let r = self.inner.clone();
        Box::pin(async move {
            let lookup = r
                .lookup_ip(name.as_str())
                .await
                .map_err(|e| std::io::Error::other(format!("dns error: {e}")))?;
            // The connector sets the port.
            let addrs: Vec<SocketAddr> = lookup.iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            if addrs.is_empty() {
                return Err(std::io::Error::other(format!(
                    "dns error: no addresses for {}",
                    name.as_str()
                )));
            }
            Ok(addrs.into_iter())
        })
    }
}
