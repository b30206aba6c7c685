//! A registration frame as a registrar sends it: length prefix, then the versioned JSON body.
#![no_main]

use culvert_cni_proto::{MAX_FRAME, decode, encode, frame_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(prefix) = data.first_chunk::<4>() {
        if let Ok(len) = frame_len(*prefix) {
            assert!(len <= MAX_FRAME, "frame_len accepted {len}");
        }
    }
    // Requests and responses share the framing; whatever decodes must encode and decode again
    // to the same message.
    if let Ok(request) = decode::<culvert_cni_proto::Request>(data) {
        let frame = encode(&request);
        assert_eq!(decode::<culvert_cni_proto::Request>(&frame[4..]).ok(), Some(request));
    }
    if let Ok(response) = decode::<culvert_cni_proto::Response>(data) {
        let frame = encode(&response);
        assert_eq!(decode::<culvert_cni_proto::Response>(&frame[4..]).ok(), Some(response));
    }
});
