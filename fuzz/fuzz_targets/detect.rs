//! Protocol detection (`proxy::detect::decide`) on any bytes: never a panic, and once a
//! prefix of the bytes decides, every longer prefix decides the same: `detect` reads
//! until the first prefix that decides, so a client's bytes must be classified alike
//! however the network splits them into reads (a request line in one segment and its
//! headers in the next, a ClientHello across records).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::fuzzing::{Detected, MAX_PREFIX, decide};

/// Inputs up to this long have every prefix checked; longer ones a sample (keeps each
/// run quadratic only in a small size).
const EVERY_PREFIX: usize = 1024;

fuzz_target!(|bytes: &[u8]| {
    let mut first: Option<(usize, Detected)> = None;
    let step = if bytes.len() <= EVERY_PREFIX { 1 } else { bytes.len() / 256 };
    let lengths = (1..=bytes.len()).step_by(step).chain([bytes.len()]);
    for len in lengths {
        let Some(d) = decide(&bytes[..len]) else {
            assert!(first.is_none(), "{len} bytes are undecided after {first:?} decided");
            continue;
        };
        let _ = d.name();
        match &first {
            None => first = Some((len, d)),
            Some((at, early)) => assert_eq!(&d, early, "{len} bytes decide otherwise than the first {at}"),
        }
    }
    if bytes.len() >= MAX_PREFIX {
        assert!(first.is_some(), "{} bytes and still undecided", bytes.len());
    }
});
