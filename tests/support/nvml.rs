//! The stand-in `libnvidia-ml.so.1` (tests/nvml/fake_nvml.c), built once per test binary with
//! gcc, and its per-test configuration file (see tests/nvml/README.md).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Path of the built library; panics with gcc's output when it does not build.
pub fn library() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nvml/fake_nvml.c");
        let dir = std::env::temp_dir().join(format!("clawnode-fake-nvml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("libnvidia-ml.so.1");
        let result = Command::new("gcc")
            .args(["-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC"])
            .arg("-Wl,-soname,libnvidia-ml.so.1")
            .arg("-o")
            .arg(&out)
            .arg(&source)
            .output()
            .expect("gcc");
        assert!(
            result.status.success(),
            "building the stand-in NVML failed:\n{}",
            String::from_utf8_lossy(&result.stderr)
        );
        out
    })
}

/// A stand-in configuration that a test rewrites (atomically) or appends to.
pub struct FakeNvml {
    pub config: PathBuf,
}

impl FakeNvml {
    pub fn new(dir: &Path, text: &str) -> FakeNvml {
        let fake = FakeNvml {
            config: dir.join("fake-nvml.conf"),
        };
        fake.write(text);
        fake
    }

    pub fn write(&self, text: &str) {
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    pub fn append(&self, line: &str) {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.config)
            .unwrap();
        writeln!(file, "{line}").unwrap();
    }

    /// The environment a clawnode process needs to use it.
    pub fn env(&self) -> [(&'static str, String); 1] {
        [("FAKE_NVML_CONFIG", self.config.display().to_string())]
    }
}
