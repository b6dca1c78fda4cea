//! REST → gRPC and back: any method, path, query and body a client sends is
//! routed and transcoded to a request message or refused with a message;
//! any upstream body is rendered as JSON or refused. Never a panic.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use meshkit_gateway::{
    contracts::Contracts,
    routes::{RouteMatch, Router},
    transcode::{render, request_message, split_frames},
};

static ROUTER: LazyLock<Router> = LazyLock::new(|| {
    let contracts = Contracts::meshkit().expect("meshkit's contracts load");
    Router::from_contracts(&contracts).expect("meshkit's routes build")
});

const METHODS: [http::Method; 5] =
    [http::Method::GET, http::Method::POST, http::Method::PUT, http::Method::PATCH, http::Method::DELETE];

fuzz_target!(|data: &[u8]| {
    // method byte, then `path?query`, a NUL, then the body.
    let Some((&which, rest)) = data.split_first() else { return };
    let (head, body) = match rest.iter().position(|&b| b == 0) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(head) = std::str::from_utf8(head) else { return };
    let (path, query) = head.split_once('?').map_or((head, None), |(p, q)| (p, Some(q)));
    let method = &METHODS[usize::from(which) % METHODS.len()];
    if let RouteMatch::Found(route, captures) = ROUTER.find(method, path) {
        let _ = request_message(route, captures, query, body);
        if let Ok(frames) = split_frames(bytes::Bytes::copy_from_slice(body)) {
            let _ = render(route, &frames);
        }
    }
});
