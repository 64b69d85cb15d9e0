//! Integration tests over real sockets, in one test binary: linking the edge and its
//! dependencies once rather than once per file keeps a clean build within a small disk.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod admin;
mod affinity;
mod analyser;
mod balance;
mod cache;
mod chain;
mod health;
mod http1;
mod keepalive;
mod per_core;
mod proxy;
mod retry;
mod security;
mod shutdown;
mod tls;
mod upstream_pool;
mod websocket;
