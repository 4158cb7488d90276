//! Replays the checked-in fuzz seed corpora (`fuzz/corpus/<target>/`) and saved crash
//! reproducers (`fuzz/artifacts-regressions/<target>/`) through the same property checks the
//! libFuzzer targets run (`fuzz/src/checks.rs`), on the stable toolchain, on every test run.
//! It must stay fast (a few hundred small files) and must not need cargo-fuzz.

#[path = "../fuzz/src/checks.rs"]
mod checks;

use std::fs;
use std::path::Path;

type Check = fn(&[u8]);

const TARGETS: [(&str, Check); 5] = [
    ("ws_reader", checks::ws_reader),
    ("http_head", checks::http_head),
    ("protocol_to_server", checks::protocol_to_server),
    ("tunnel_socket", checks::tunnel_socket),
    ("gateway_core", checks::gateway_core),
];

/// Runs `check` on every file of `dir` (if it exists); returns how many ran.
fn replay(dir: &Path, check: Check) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    for path in &files {
        let data = fs::read(path).expect("read corpus file");
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "check failed on {}", path.display());
    }
    files.len()
}

#[test]
fn seed_corpora_and_regressions_pass_the_fuzz_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (target, check) in TARGETS {
        let seeds = replay(&root.join("corpus").join(target), check);
        assert!(seeds > 0, "no seed corpus for {target}");
        replay(&root.join("artifacts-regressions").join(target), check);
    }
}

#[test]
fn hand_written_inputs_pass_the_fuzz_checks() {
    // A text frame with invalid UTF-8 must be refused, not delivered: the check passes.
    checks::ws_reader(&[0, 1, 0x81, 0x82, 0, 0, 0, 0, 0xc3, 0x28]);
    // An empty input is an error for both decoders.
    checks::protocol_to_server(&[]);
}

/// The `record_after_close_in_open` seed without the tolerance of the known bug: a client the
/// core aborts (too slow) while its open exchange still waits is accepted by the runner's
/// later `WebSocketOpen { canHibernate: true }`; `client_opened` then sends the engine a
/// hibernating record of a closing socket, which no close will ever forget.
#[test]
fn closed_opening_client_is_not_accepted() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus/gateway_core/record_after_close_in_open");
    checks::gateway_core_strict(&fs::read(path).expect("seed"));
}
