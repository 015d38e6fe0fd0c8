//! File helpers for tests in every crate of the workspace (the cli's and server's tests take
//! this file by `#[path]`): std only, so that any test crate can include it.

use std::path::Path;

/// Copies the directory `from` to `to`, recursively (a fixture pack into a test's scratch dir).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dst = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dst);
        } else {
            std::fs::copy(&path, &dst).unwrap();
        }
    }
}
