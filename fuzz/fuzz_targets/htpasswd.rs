//! The htpasswd file and the `Proxy-Authorization: Basic` value: never a panic; every user of a file
//! that loads has a bcrypt hash; credentials that decode have a user without a colon.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnelgate_proxy::auth::{parse_basic, parse_htpasswd};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(users) = parse_htpasswd(text) {
            for (user, (hash, _)) in &users {
                assert!(!user.is_empty() && !user.contains(':'));
                assert!(hash.starts_with("$2"));
            }
        }
    }
    if let Some((user, _password)) = parse_basic(data) {
        assert!(!user.contains(':'), "the user ends at the first colon");
    }
});
