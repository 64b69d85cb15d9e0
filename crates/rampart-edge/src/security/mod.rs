//! The security stages of the pipeline, in the order a request meets them:
//! framing checks ([`framing`]) and path normalisation ([`normalize`]) before
//! routing. Each refusal has a reason code, shows in the access log, in
//! `rampart_security_decisions_total`, and in the answer's JSON `detail`.

pub mod access;
pub mod expr;
pub mod framing;
pub mod guard;
pub mod normalize;
pub mod proxy_protocol;
pub mod rate_limit;
pub mod waf;
