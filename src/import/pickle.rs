//! A pickle reader for the subset of the format that `torch.save` writes for a state_dict.
//!
//! Nothing is executed: globals are kept as names, and the only calls given meaning are the
//! few that rebuild a state_dict (`collections.OrderedDict()`, `torch._utils._rebuild_tensor_v2`
//! and `_rebuild_parameter`). Any other call becomes an opaque [`Value::Object`], so a file
//! holding something else parses but is then refused by the caller with what it holds.
//!
//! Hand-written rather than a crate: serde-pickle has no persistent ids (how torch refers to
//! tensor storages), and the crates that read torch pickles come inside whole ML frameworks.

use std::collections::HashMap;

/// A tensor's storage, as `torch.save` names it in a persistent id:
/// `('storage', torch.FloatStorage, '0', 'cpu', numel)`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    /// `FloatStorage`, `BFloat16Storage`, ...
    pub kind: String,
    /// The archive entry `data/<key>`.
    pub key: String,
    pub numel: usize,
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)`: a strided view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Dicts and OrderedDicts, in insertion order.
    Dict(Vec<(Value, Value)>),
    Global {
        module: String,
        name: String,
    },
    Storage(StorageRef),
    Tensor(TensorRef),
    /// The result of calling or instantiating anything else, by its class name.
    Object(String),
}

impl Value {
    /// What this value is, for error messages.
    pub fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) => "an int".into(),
            Value::Float(_) => "a float".into(),
            Value::Str(s) => format!("the string {s:?}"),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global { module, name } => format!("the global {module}.{name}"),
            Value::Storage(_) => "a storage".into(),
            Value::Tensor(t) => format!("a tensor of shape {:?}", t.shape),
            Value::Object(class) => format!("a {class} object"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("pickle byte {offset}: {reason}")]
pub struct PickleError {
    pub offset: usize,
    pub reason: String,
}

/// Parses one pickle and returns the value STOP leaves on the stack.
pub fn parse(data: &[u8]) -> Result<Value, PickleError> {
    Unpickler { data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() }.run()
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl Unpickler<'_> {
    fn fail<T>(&self, reason: impl Into<String>) -> Result<T, PickleError> {
        Err(PickleError { offset: self.pos, reason: reason.into() })
    }

    fn take(&mut self, n: usize) -> Result<&[u8], PickleError> {
        if self.data.len() - self.pos < n {
            return self.fail(format!("needs {n} more bytes but the pickle ends (truncated)"));
        }
        let bytes = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PickleError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Result<String, PickleError> {
        let rest = &self.data[self.pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return self.fail("unterminated line (truncated)");
        };
        let text = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(text)
    }

    fn utf8(&mut self, n: usize) -> Result<Value, PickleError> {
        let start = self.pos;
        let bytes = self.take(n)?.to_vec();
        String::from_utf8(bytes)
            .map(Value::Str)
            .map_err(|_| PickleError { offset: start, reason: "string is not UTF-8".into() })
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.fail("stack underflow"),
        }
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        if self.stack.is_empty() {
            return self.fail("stack underflow");
        }
        Ok(self.stack.last_mut().unwrap())
    }

    /// The items above the innermost MARK, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let Some(mark) = self.marks.pop() else { return self.fail("no MARK to pop to") };
        if mark > self.stack.len() {
            return self.fail("MARK above the stack");
        }
        Ok(self.stack.split_off(mark))
    }

    fn memo_get(&self, key: u32) -> Result<Value, PickleError> {
        match self.memo.get(&key) {
            Some(v) => Ok(v.clone()),
            None => self.fail(format!("memo key {key} was never stored")),
        }
    }

    fn memo_put(&mut self, key: u32) -> Result<(), PickleError> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn run(mut self) -> Result<Value, PickleError> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return self.fail(format!("pickle protocol {proto} is newer than 5"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return self.fail(format!("a {n}-byte integer is out of range"));
                    }
                    let bytes = self.take(n)?;
                    let mut buf = if bytes.last().is_some_and(|&b| b & 0x80 != 0) { [0xff; 8] } else { [0; 8] };
                    buf[..n].copy_from_slice(bytes);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)))
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.utf8(n)?;
                    self.stack.push(v)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.utf8(n)?;
                    self.stack.push(v)
                }
                0x8d => {
                    let n = self.u64()?;
                    let v = self.utf8(usize::try_from(n).unwrap_or(usize::MAX))?;
                    self.stack.push(v)
                }
                b'T' | b'U' | b'B' | b'C' => {
                    let n = if matches!(op, b'T' | b'B') { self.u32()? as usize } else { self.u8()? as usize };
                    let bytes = self.take(n)?.to_vec();
                    self.stack.push(if matches!(op, b'T' | b'U') {
                        Value::Str(bytes.iter().map(|&b| b as char).collect())
                    } else {
                        Value::Bytes(bytes)
                    })
                }
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items))
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.stack.push(Value::Dict(pairs))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return self.fail("stack underflow");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items))
                }
                b'q' => {
                    let key = self.u8()? as u32;
                    self.memo_put(key)?
                }
                b'r' => {
                    let key = self.u32()?;
                    self.memo_put(key)?
                }
                0x94 => {
                    let key = self.memo.len() as u32;
                    self.memo_put(key)?
                }
                b'h' => {
                    let key = self.u8()? as u32;
                    let v = self.memo_get(key)?;
                    self.stack.push(v)
                }
                b'j' => {
                    let key = self.u32()?;
                    let v = self.memo_get(key)?;
                    self.stack.push(v)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global { module, name })
                }
                0x93 => {
                    let (name, module) = (self.pop()?, self.pop()?);
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return self.fail("STACK_GLOBAL needs two strings");
                    };
                    self.stack.push(Value::Global { module, name })
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(pid)?;
                    self.stack.push(storage)
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args)?;
                    self.stack.push(v)
                }
                0x81 => {
                    let _args = self.pop()?;
                    let class = self.pop()?;
                    self.stack.push(Value::Object(class_name(&class)))
                }
                b'b' => {
                    // BUILD sets attributes (a state_dict's `_metadata`): nothing we read.
                    self.pop()?;
                    self.top()?;
                }
                b's' => {
                    let (v, k) = (self.pop()?, self.pop()?);
                    self.insert(vec![(k, v)])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = self.pairs(items)?;
                    self.insert(pairs)?
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v)
                }
                _ => {
                    self.pos = at;
                    return self.fail(format!("unsupported pickle opcode 0x{op:02x} (not written by torch.save)"));
                }
            }
        }
    }

    fn pairs(&self, items: Vec<Value>) -> Result<Vec<(Value, Value)>, PickleError> {
        if !items.len().is_multiple_of(2) {
            return self.fail("odd number of items for a dict");
        }
        let mut it = items.into_iter();
        Ok(std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect())
    }

    fn insert(&mut self, pairs: Vec<(Value, Value)>) -> Result<(), PickleError> {
        match self.top()? {
            Value::Dict(items) => {
                items.extend(pairs);
                Ok(())
            }
            other => {
                let what = other.describe();
                self.fail(format!("SETITEM on {what}"))
            }
        }
    }

    fn append(&mut self, values: Vec<Value>) -> Result<(), PickleError> {
        match self.top()? {
            Value::List(items) => {
                items.extend(values);
                Ok(())
            }
            other => {
                let what = other.describe();
                self.fail(format!("APPEND on {what}"))
            }
        }
    }

    fn persistent_load(&self, pid: Value) -> Result<Value, PickleError> {
        let Value::Tuple(parts) = &pid else { return self.fail(format!("persistent id is {}", pid.describe())) };
        match parts.as_slice() {
            [Value::Str(tag), Value::Global { name, .. }, Value::Str(key), Value::Str(_location), Value::Int(numel)]
                if tag == "storage" && *numel >= 0 =>
            {
                Ok(Value::Storage(StorageRef { kind: name.clone(), key: key.clone(), numel: *numel as usize }))
            }
            _ => self.fail("persistent id is not a torch storage ('storage', type, key, location, numel)"),
        }
    }

    fn call(&self, callable: Value, args: Value) -> Result<Value, PickleError> {
        let Value::Global { module, name } = &callable else {
            return Ok(Value::Object(class_name(&callable)));
        };
        let Value::Tuple(args) = args else {
            return self.fail(format!("arguments of {module}.{name} are not a tuple"));
        };
        match (module.as_str(), name.as_str()) {
            ("collections", "OrderedDict") if args.is_empty() => Ok(Value::Dict(Vec::new())),
            ("torch._utils", "_rebuild_tensor_v2") => self.rebuild_tensor(&args),
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => match args.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => self.fail(format!("{name} without a tensor")),
            },
            _ => Ok(Value::Object(format!("{module}.{name}"))),
        }
    }

    fn rebuild_tensor(&self, args: &[Value]) -> Result<Value, PickleError> {
        let ints = |v: &Value| -> Option<Vec<usize>> {
            let Value::Tuple(items) = v else { return None };
            items.iter().map(|i| if let Value::Int(n) = i { usize::try_from(*n).ok() } else { None }).collect()
        };
        match args {
            [Value::Storage(storage), Value::Int(offset), size, stride, ..] if *offset >= 0 => {
                let (Some(shape), Some(stride)) = (ints(size), ints(stride)) else {
                    return self.fail("tensor size or stride is not a tuple of non-negative ints");
                };
                if shape.len() != stride.len() {
                    return self.fail(format!("tensor has {} sizes but {} strides", shape.len(), stride.len()));
                }
                Ok(Value::Tensor(TensorRef { storage: storage.clone(), offset: *offset as usize, shape, stride }))
            }
            _ => self.fail("_rebuild_tensor_v2 arguments are not (storage, offset, size, stride, ...)"),
        }
    }
}

fn class_name(v: &Value) -> String {
    match v {
        Value::Global { module, name } => format!("{module}.{name}"),
        other => other.describe(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_dict_of_basic_values() {
        // pickle.dumps({'a': 1, 'b': [True, None, 'x', -2, 300, 1.5]}, protocol=2)
        let data = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(\x88NX\x01\x00\x00\x00xq\x04J\xfe\xff\xff\xffM,\x01G?\xf8\x00\x00\x00\x00\x00\x00eu.";
        let v = parse(data).unwrap();
        let want = Value::Dict(vec![
            (Value::Str("a".into()), Value::Int(1)),
            (
                Value::Str("b".into()),
                Value::List(vec![
                    Value::Bool(true),
                    Value::None,
                    Value::Str("x".into()),
                    Value::Int(-2),
                    Value::Int(300),
                    Value::Float(1.5),
                ]),
            ),
        ]);
        assert_eq!(v, want);
    }

    #[test]
    fn long1_is_twos_complement() {
        // pickle.dumps(-(2**40), protocol=2) and 2**40
        assert_eq!(parse(b"\x80\x02\x8a\x06\x00\x00\x00\x00\x00\xff.").unwrap(), Value::Int(-(1 << 40)));
        assert_eq!(parse(b"\x80\x02\x8a\x06\x00\x00\x00\x00\x00\x01.").unwrap(), Value::Int(1 << 40));
    }

    #[test]
    fn truncation_and_unknown_opcodes_are_errors_with_offsets() {
        let e = parse(b"\x80\x02X\x10\x00\x00\x00ab").unwrap_err();
        assert!(e.reason.contains("truncated"), "{e}");
        let e = parse(b"\x80\x02\xff").unwrap_err();
        assert_eq!(e.offset, 2);
        assert!(e.reason.contains("0xff"), "{e}");
        assert!(parse(b"\x80\x02").unwrap_err().reason.contains("truncated"));
        assert!(parse(b"h\x05.").unwrap_err().reason.contains("memo key 5"));
    }

    #[test]
    fn unknown_calls_are_opaque_objects_not_errors() {
        // c__main__\nNet\n)R.  -> Net()
        let v = parse(b"\x80\x02c__main__\nNet\n)R.").unwrap();
        assert_eq!(v, Value::Object("__main__.Net".into()));
    }
}
