//! Recordings: where a run's hidden states come from, found by a directory or a glob, and read
//! one at a time as a worker starts on it.
//!
//! Why here and not in the core: a recording is the unit of offline work (one sequence, never
//! split across sessions), and both the command line and the Python package (its Ray path)
//! must name and read recordings the same way, so the datasets they write agree row for row.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use probe_cascade::npy::{Matrix, NpyError};

/// Why a recording could not be found or read.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("--traces {spec}: {reason}")]
    Spec { spec: String, reason: String },
    #[error("--traces {spec}: {source}")]
    Glob {
        spec: String,
        #[source]
        source: glob::PatternError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Npy(#[from] NpyError),
    #[error("{path}: not a safetensors file: {source}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{path}: tensor `{tensor}` {reason}")]
    Tensor { path: PathBuf, tensor: String, reason: String },
    #[error("two recordings are named `{name}`: {first} and {second}")]
    Duplicate { name: String, first: String, second: String },
}

/// Where one recording's T×D float32 hidden states are.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A 2-D float32 `.npy`.
    Npy(PathBuf),
    /// One 2-D tensor (F32, F16 or BF16) of a safetensors file.
    Safetensors { path: PathBuf, tensor: String },
    /// States already in memory (the Python package's arrays).
    Matrix(Matrix),
}

/// One recording: a name (unique in a run; the `recording` column of every table) and its
/// states.
#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    pub name: String,
    pub source: Source,
}

impl Recording {
    /// Reads the states (a blocking read; the runner calls it on a blocking thread).
    pub fn load(self) -> Result<Matrix, RecordingError> {
        match self.source {
            Source::Npy(path) => Ok(probe_cascade::npy::read(&path)?),
            Source::Safetensors { path, tensor } => read_tensor(&path, &tensor),
            Source::Matrix(m) => Ok(m),
        }
    }

    /// Where the states are, for messages.
    pub fn origin(&self) -> String {
        match &self.source {
            Source::Npy(p) => p.display().to_string(),
            Source::Safetensors { path, tensor } => format!("{}:{tensor}", path.display()),
            Source::Matrix(m) => format!("an array of {}×{}", m.rows, m.cols),
        }
    }
}

/// The recordings `spec` names, sorted by name: every `.npy` and `.safetensors` file of a
/// directory (not its subdirectories), or the files a glob pattern matches. A `.npy` is one
/// recording named by its file stem; a safetensors file holds one recording per tensor, named
/// `<file stem>/<tensor>`. Two recordings with one name are an error naming both files.
pub fn discover(spec: &str) -> Result<Vec<Recording>, RecordingError> {
    let bad = |reason: String| RecordingError::Spec { spec: spec.to_string(), reason };
    let path = Path::new(spec);
    let files: Vec<PathBuf> = if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|source| RecordingError::Io { path: path.into(), source })?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| RecordingError::Io { path: path.into(), source })?;
            let p = entry.path();
            if p.is_file() && kind_of(&p).is_some() {
                files.push(p);
            }
        }
        files
    } else {
        let matches = glob::glob(spec).map_err(|source| RecordingError::Glob { spec: spec.to_string(), source })?;
        let mut files = Vec::new();
        for m in matches {
            let p = m.map_err(|e| RecordingError::Io { path: e.path().to_path_buf(), source: e.into() })?;
            if p.is_file() {
                if kind_of(&p).is_none() {
                    return Err(bad(format!("{} is neither a .npy nor a .safetensors file", p.display())));
                }
                files.push(p);
            }
        }
        files
    };
    if files.is_empty() {
        return Err(bad(if path.is_dir() {
            "the directory holds no .npy or .safetensors file".into()
        } else if path.exists() {
            "not a directory, and no file matches it as a glob".into()
        } else {
            "no such directory, and no file matches it as a glob".into()
        }));
    }
    let mut by_name: BTreeMap<String, Recording> = BTreeMap::new();
    for file in files {
        for recording in recordings_in(&file)? {
            if let Some(first) = by_name.get(&recording.name) {
                return Err(RecordingError::Duplicate {
                    name: recording.name.clone(),
                    first: first.origin(),
                    second: recording.origin(),
                });
            }
            by_name.insert(recording.name.clone(), recording);
        }
    }
    Ok(by_name.into_values().collect())
}

#[derive(Clone, Copy)]
enum Kind {
    Npy,
    Safetensors,
}

fn kind_of(p: &Path) -> Option<Kind> {
    match p.extension()?.to_str()? {
        "npy" => Some(Kind::Npy),
        "safetensors" => Some(Kind::Safetensors),
        _ => None,
    }
}

fn stem(p: &Path) -> String {
    p.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned())
}

fn recordings_in(file: &Path) -> Result<Vec<Recording>, RecordingError> {
    match kind_of(file) {
        Some(Kind::Npy) => Ok(vec![Recording { name: stem(file), source: Source::Npy(file.to_path_buf()) }]),
        Some(Kind::Safetensors) => {
            let map = map(file)?;
            let st = safetensors::SafeTensors::deserialize(&map)
                .map_err(|source| RecordingError::Safetensors { path: file.into(), source })?;
            let mut names = st.names();
            names.sort();
            Ok(names
                .into_iter()
                .map(|tensor| Recording {
                    name: format!("{}/{tensor}", stem(file)),
                    source: Source::Safetensors { path: file.to_path_buf(), tensor: tensor.to_string() },
                })
                .collect())
        }
        None => Ok(Vec::new()),
    }
}

fn map(path: &Path) -> Result<memmap2::Mmap, RecordingError> {
    let file = std::fs::File::open(path).map_err(|source| RecordingError::Io { path: path.into(), source })?;
    // SAFETY: the map is read only while this function's caller holds it; a file changed
    // underneath gives wrong values or a checked parse error, never undefined behaviour in
    // safe code beyond what reading a changing file gives.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|source| RecordingError::Io { path: path.into(), source })
}

/// One tensor of a safetensors file as a T×D float32 matrix.
fn read_tensor(path: &Path, tensor: &str) -> Result<Matrix, RecordingError> {
    let map = map(path)?;
    let st = safetensors::SafeTensors::deserialize(&map)
        .map_err(|source| RecordingError::Safetensors { path: path.into(), source })?;
    let bad = |reason: String| RecordingError::Tensor { path: path.into(), tensor: tensor.into(), reason };
    let view = st.tensor(tensor).map_err(|_| bad("is not in the file".into()))?;
    let [rows, cols] = view.shape() else {
        return Err(bad(format!("has shape {:?}: a recording is 2-D, tokens × hidden size", view.shape())));
    };
    let (rows, cols) = (*rows, *cols);
    let bytes = view.data();
    use safetensors::Dtype;
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => return Err(bad(format!("has dtype {other:?}: recordings are F32, F16 or BF16"))),
    };
    Ok(Matrix { rows, cols, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(dir: &Path, name: &str, rows: usize, cols: usize) -> PathBuf {
        let p = dir.join(name);
        let m = Matrix { rows, cols, data: (0..rows * cols).map(|i| i as f32).collect() };
        probe_cascade::npy::write(&p, &m).unwrap();
        p
    }

    fn safetensors_file(dir: &Path, name: &str, tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(name)).unwrap();
    }

    #[test]
    fn a_directory_gives_its_npy_files_and_each_safetensors_tensor_sorted_by_name() {
        let dir = tempfile::tempdir().unwrap();
        npy(dir.path(), "b.npy", 2, 3);
        npy(dir.path(), "a.npy", 1, 3);
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let f32s: Vec<u8> = [1.5f32, 2.0, 3.0, 4.0, 5.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf16s: Vec<u8> = [1.5f32, -2.0, 0.25].iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        safetensors_file(
            dir.path(),
            "many.safetensors",
            &[("z", safetensors::Dtype::F32, vec![2, 3], f32s), ("y", safetensors::Dtype::BF16, vec![1, 3], bf16s)],
        );
        let found = discover(dir.path().to_str().unwrap()).unwrap();
        let names: Vec<&str> = found.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "many/y", "many/z"]);
        let y = found[2].clone().load().unwrap();
        assert_eq!((y.rows, y.cols, y.data.clone()), (1, 3, vec![1.5, -2.0, 0.25]));
        let z = found[3].clone().load().unwrap();
        assert_eq!((z.rows, z.cols), (2, 3));
        assert_eq!(z.data[0], 1.5);
        assert_eq!(found[1].clone().load().unwrap().rows, 2);
    }

    #[test]
    fn a_glob_picks_files_and_an_empty_match_is_an_error_naming_the_spec() {
        let dir = tempfile::tempdir().unwrap();
        npy(dir.path(), "run1.npy", 1, 2);
        npy(dir.path(), "run2.npy", 1, 2);
        npy(dir.path(), "other.npy", 1, 2);
        let spec = format!("{}/run*.npy", dir.path().display());
        let names: Vec<String> = discover(&spec).unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["run1", "run2"]);
        let none = format!("{}/nothing*.npy", dir.path().display());
        let err = discover(&none).unwrap_err().to_string();
        assert!(err.contains(&none) && err.contains("no file matches"), "{err}");
    }

    #[test]
    fn two_recordings_with_one_name_are_an_error_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("x")).unwrap();
        std::fs::create_dir(dir.path().join("y")).unwrap();
        let a = npy(&dir.path().join("x"), "run.npy", 1, 2);
        let b = npy(&dir.path().join("y"), "run.npy", 1, 2);
        let err = discover(&format!("{}/*/run.npy", dir.path().display())).unwrap_err().to_string();
        assert!(err.contains(&a.display().to_string()) && err.contains(&b.display().to_string()), "{err}");
    }

    #[test]
    fn a_tensor_that_is_not_two_dimensional_or_not_float_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        safetensors_file(
            dir.path(),
            "t.safetensors",
            &[
                ("flat", safetensors::Dtype::F32, vec![4], vec![0; 16]),
                ("ints", safetensors::Dtype::I32, vec![1, 2], vec![0; 8]),
            ],
        );
        let found = discover(dir.path().to_str().unwrap()).unwrap();
        let flat = found.iter().find(|r| r.name == "t/flat").unwrap().clone().load().unwrap_err().to_string();
        assert!(flat.contains("`flat`") && flat.contains("2-D"), "{flat}");
        let ints = found.iter().find(|r| r.name == "t/ints").unwrap().clone().load().unwrap_err().to_string();
        assert!(ints.contains("`ints`") && ints.contains("I32"), "{ints}");
    }
}
