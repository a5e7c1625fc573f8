//! The agent's HTTP/1 client (`proxy::http::h1`) decoding any bytes an endpoint could
//! send as its response: never a panic, and the same result (head, body, trailers,
//! whether the connection may be reused, or the same error) however the bytes are split
//! into reads. The first byte says whether the request was a HEAD (which changes the
//! framing); the rest is the response.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::fuzzing::decode_response;

/// Inputs up to this long are also fed a byte at a time, and split in two at every
/// point; longer ones at a sample of points (keeps each run quadratic only in a small
/// size).
const EVERY_SPLIT: usize = 512;

fuzz_target!(|bytes: &[u8]| {
    let Some((&flags, response)) = bytes.split_first() else { return };
    let head_request = flags & 1 == 1;
    let decode = |reads: &mut dyn Iterator<Item = &[u8]>| decode_response(reads, head_request).map_err(|e| e.to_string());
    let whole = decode(&mut std::iter::once(response));
    if let Ok(d) = &whole {
        assert!(d.status >= 200, "an informational answer is not the response: {d:?}");
        if head_request || d.status == 204 || d.status == 304 {
            assert!(d.body.is_empty() && d.trailers.is_none(), "a bodiless response with a body: {d:?}");
        }
    }
    let step = if response.len() <= EVERY_SPLIT { 1 } else { response.len() / 64 };
    if response.len() <= EVERY_SPLIT {
        assert_eq!(decode(&mut response.chunks(1)), whole, "fed a byte at a time");
    }
    for at in (1..response.len()).step_by(step) {
        let (a, b) = response.split_at(at);
        assert_eq!(decode(&mut [a, b].into_iter()), whole, "split at {at}");
    }
});
