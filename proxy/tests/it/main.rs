#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test harness")]
//! Integration tests of the proxy on loopback, named after the ids of SECURITY-CASES.md.

mod support;

mod acme;
mod auth;
mod binary;
mod dryrun;
mod http;
mod parents;
mod parsing;
mod reload;
mod resources;
mod ssrf;
mod termination;
mod tls;
mod transparent;
mod tunnel;
