//! Where the binaries under test are: `FERROX_BIN_DIR`, or the cargo target directory the test
//! binary itself runs from (`cargo xtask test` builds every binary first).

use std::path::PathBuf;

pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("FERROX_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            // target/<profile>/deps/<test-binary> -> target/<profile>
            let exe = std::env::current_exe().expect("current_exe");
            let mut dir = exe.parent().expect("exe dir").to_path_buf();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found; build the binaries first (`cargo xtask test` does, or `cargo build --bins`), or set FERROX_BIN_DIR",
        path.display()
    );
    path
}
