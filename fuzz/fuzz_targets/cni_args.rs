//! `CNI_ARGS` as a runtime sets it (`K8S_POD_NAMESPACE=...;K8S_POD_NAME=...`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|args: &str| {
    if let Some(pod) = culvert_cni::pod_ref(Some(args)) {
        assert!(!pod.namespace.is_empty() && !pod.name.is_empty());
    }
});
