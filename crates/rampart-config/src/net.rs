//! CIDR networks for trusted-proxy and access lists.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 network such as `10.0.0.0/8`, `::1/128` or a bare address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // Treat IPv4-mapped IPv6 peers as IPv4.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Parse a config list of IPs or CIDRs: the networks, and an error at `FIELD[i]`
/// for each entry that is not one.
pub fn parse_cidrs(list: &[String], field: &str) -> (Vec<Cidr>, Vec<(String, String)>) {
    let mut nets = Vec::with_capacity(list.len());
    let mut errs = Vec::new();
    for (i, c) in list.iter().enumerate() {
        match c.parse::<Cidr>() {
            Ok(n) => nets.push(n),
            Err(e) => errs.push((format!("{field}[{i}]"), e)),
        }
    }
    (nets, errs)
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}` has an invalid prefix length (0..={max})"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn matches() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap_or(Cidr {
            addr: ip("0.0.0.0"),
            prefix: 32,
        });
        assert!(c.contains(ip("10.1.2.3")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.9.9.9")));
        let all: Result<Cidr, _> = "0.0.0.0/0".parse();
        assert!(all.is_ok_and(|c| c.contains(ip("1.2.3.4"))));
        let v6: Result<Cidr, _> = "2001:db8::/32".parse();
        assert!(v6.is_ok_and(|c| c.contains(ip("2001:db8::1")) && !c.contains(ip("2001:db9::1"))));
        let one: Result<Cidr, _> = "127.0.0.1".parse();
        assert!(one.is_ok_and(|c| c.contains(ip("127.0.0.1")) && !c.contains(ip("127.0.0.2"))));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
    }
}
