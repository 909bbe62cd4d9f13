//! Socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`): a value kept on the socket itself,
//! created on demand and freed with the socket by the kernel. Nothing is shared between
//! sockets, so no sandbox can push another's values out, and a socket without a value
//! costs a lookup on its own storage list (no hash, no lock).
//!
//! Declared as a BTF map (a struct in the `.maps` section, as libbpf's `__uint`/`__type`
//! macros write it): the kernel refuses socket storage without BTF for its key and value.
use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE},
    helpers::generated::bpf_sk_storage_get,
};

/// `BPF_MAP_TYPE_SK_STORAGE`.
const MAP_TYPE: usize = 24;
/// `LIBBPF_PIN_BY_NAME`: pinned under the loader's map pin path, so a restarted daemon
/// keeps the values of sockets opened before.
const PIN_BY_NAME: usize = 1;

/// Socket storage holding a `V` per socket, as its BTF map definition: each field's
/// pointee carries a number in its array length (the BTF convention); nothing is ever
/// read through these pointers. The static holding it must be the definition itself (the
/// loader reads the fields of the static's own type), in section `.maps`.
#[repr(C)]
pub struct SkStorage<V> {
    r#type: *const [i32; MAP_TYPE],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    key: *const i32,
    value: *const V,
    pinning: *const [i32; PIN_BY_NAME],
}

// SAFETY: the definition is never written or read through; the kernel owns the values.
unsafe impl<V: Sync> Sync for SkStorage<V> {}

impl<V> SkStorage<V> {
    pub const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            map_flags: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            pinning: ptr::null(),
        }
    }

    #[inline(always)]
    fn map(&self) -> *mut c_void {
        ptr::from_ref(self).cast_mut().cast()
    }

    /// The socket's value, created zeroed first if `create`.
    #[inline(always)]
    fn value(&self, sk: *mut c_void, create: bool) -> *mut V {
        let flags = if create {
            u64::from(BPF_SK_STORAGE_GET_F_CREATE)
        } else {
            0
        };
        // SAFETY: helper valid in the program types using it; `sk` is a socket pointer
        // the verifier knows as one (a context's `sk`, or the context of a `cgroup_sock`
        // program). A null return is handled by the callers.
        unsafe { bpf_sk_storage_get(self.map(), sk, ptr::null_mut(), flags) }.cast()
    }

    /// A copy of the socket's value, if it has one.
    #[inline(always)]
    pub fn get(&self, sk: *mut c_void) -> Option<V>
    where
        V: Copy,
    {
        // SAFETY: a non-null return points at the socket's value, live while `sk` is.
        unsafe { self.value(sk, false).as_ref() }.copied()
    }

    /// Runs `f` on the socket's value, if it has one. Never allocates, so never fails
    /// for a socket that has one.
    #[inline(always)]
    pub fn update<R>(&self, sk: *mut c_void, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        // SAFETY: as in `get`; the program runs to completion holding the socket.
        unsafe { self.value(sk, false).as_mut() }.map(f)
    }

    /// Runs `f` on the socket's value, created (zeroed) if it has none. `None` if it could
    /// not be created (the socket's option memory is used up, or the kernel's).
    #[inline(always)]
    pub fn update_or_create<R>(&self, sk: *mut c_void, f: impl FnOnce(&mut V) -> R) -> Option<R> {
        // SAFETY: as in `update`.
        unsafe { self.value(sk, true).as_mut() }.map(f)
    }
}
