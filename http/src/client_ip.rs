//! The client's address, for `context.ip`.
//!
//! `X-Forwarded-For` is whatever the sender wrote, so it is believed only
//! from a configured trusted proxy: the chain is walked from the right (the
//! peer that connected, then each address the proxies appended), and the
//! client is the first address that is not a trusted proxy. With no trusted
//! proxies (the default) the header is ignored and the peer is the client.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use ipnet::IpNet;

/// The addresses and networks whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

/// The client address resolved for a request, in its extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

impl TrustedProxies {
    /// Parses addresses (`10.0.0.7`, `::1`) and networks (`10.0.0.0/8`).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        entries
            .iter()
            .map(|e| {
                let e = e.as_ref().trim();
                e.parse::<IpNet>()
                    .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{e:?} is not an ip address or cidr network"))
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client of a request that came from `peer` with `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = canonical(peer);
        if !self.trusts(client) {
            return client;
        }
        // Several X-Forwarded-For headers form one list, in order.
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for hop in hops.iter().rev() {
            // An entry that is no address ends what can be believed.
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                break;
            };
            client = canonical(ip);
            if !self.trusts(client) {
                break;
            }
        }
        client
    }
}

/// An IPv4 peer on a dual-stack socket arrives as `::ffff:a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Middleware: puts the [`ClientIp`] of the request in its extensions (when
/// the server provides the peer address).
pub async fn resolve_client_ip(
    State(proxies): State<Arc<TrustedProxies>>,
    mut req: Request,
    next: Next,
) -> Response {
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
        let ip = proxies.client(peer.ip(), req.headers());
        req.extensions_mut().insert(ClientIp(ip));
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        let none = TrustedProxies::default();
        assert_eq!(
            none.client(ip("203.0.113.9"), &xff(&["1.2.3.4"])),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn the_right_most_untrusted_address_is_the_client() {
        let p = TrustedProxies::parse(&["10.0.0.0/8", "192.0.2.1"]).unwrap();
        // A client forging the first entry does not fool the proxies.
        let h = xff(&["6.6.6.6, 198.51.100.7", "10.1.1.1"]);
        assert_eq!(p.client(ip("192.0.2.1"), &h), ip("198.51.100.7"));
        // An untrusted peer is the client, whatever it says.
        assert_eq!(p.client(ip("198.51.100.8"), &h), ip("198.51.100.8"));
        // All trusted: the left-most.
        assert_eq!(
            p.client(ip("10.0.0.1"), &xff(&["10.0.0.2"])),
            ip("10.0.0.2")
        );
        // Garbage stops the walk at the last address believed.
        assert_eq!(
            p.client(ip("10.0.0.1"), &xff(&["1.1.1.1, junk"])),
            ip("10.0.0.1")
        );
        // Mapped IPv4 peers match IPv4 networks.
        assert_eq!(
            p.client(ip("::ffff:10.0.0.1"), &xff(&["1.1.1.1"])),
            ip("1.1.1.1")
        );
    }

    #[test]
    fn bad_entries_are_refused() {
        assert!(TrustedProxies::parse(&["10.0.0.0/33"]).is_err());
        assert!(TrustedProxies::parse(&["proxy.local"]).is_err());
    }
}
