//! Containing panics of the storage engine.
//!
//! redb panics on some damaged files (a truncated file at open, a page of random bytes at the
//! first read). A panic on the store thread used to kill that thread and leave a daemon that
//! answered `kv.unavailable` while claiming to be ready. [`contain`] runs a call under
//! `catch_unwind` and turns a panic into an error message; the panic hook stays quiet for
//! contained panics (the message goes to the error instead of a bare "thread panicked" line on
//! stderr, which an operator would read as a crash).
//!
//! This module must never swallow a panic outside a `contain` call: other panics go to the
//! hook that was installed before.

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Depth of `contain` calls on this thread.
    static CONTAINED: Cell<u32> = const { Cell::new(0) };
    /// The hook's description (message and location) of the last contained panic.
    static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

fn install_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CONTAINED.with(|c| c.get()) > 0 {
                let payload = info.payload();
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_string());
                let text = match info.location() {
                    Some(l) => format!("{msg}, at {}:{}", l.file(), l.line()),
                    None => msg,
                };
                LAST.with(|l| *l.borrow_mut() = Some(text));
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `f`; a panic inside it is caught and returned as `Err(description)`.
pub(crate) fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_hook();
    CONTAINED.with(|c| c.set(c.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(c.get().saturating_sub(1)));
    result.map_err(|payload| {
        let hooked = LAST.with(|l| l.borrow_mut().take());
        hooked.unwrap_or_else(|| {
            if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "a panic without a message".to_string()
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::contain;

    #[test]
    fn a_contained_panic_becomes_an_error_with_its_message() {
        let r: Result<(), String> = contain(|| panic!("boom {}", 42));
        let e = r.unwrap_err();
        assert!(e.contains("boom 42"), "{e}");
        assert_eq!(contain(|| 7), Ok(7));
    }
}
