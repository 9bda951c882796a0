//! A restricted, non-executing reader for the pickles inside PyTorch `torch.save` archives.
//!
//! Python's pickle format is a small stack machine whose `GLOBAL`/`REDUCE` opcodes can call any
//! importable function, so unpickling an untrusted file is code execution. This reader never runs
//! anything: it interprets the opcodes PyTorch emits (protocol 2, plus the few protocol 4 ones newer
//! writers may use) and knows a fixed allow-list of globals — `collections.OrderedDict`, the tensor
//! rebuild helpers and the typed storage classes — whose effect it reproduces itself. Any other
//! global is refused, so a hostile file can at worst produce an error.
//!
//! Objects live in an arena and the stack/memo hold indices into it, which gives Python's reference
//! semantics (a dict memoised before `SETITEMS` fills it is the same dict when fetched later). The
//! result is converted into a plain [`Value`] tree at `STOP`, with limits on depth and size so that
//! shared or cyclic references cannot blow up.
use std::collections::HashMap;

/// Element type of a torch storage, from its legacy class name (`torch.FloatStorage`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StorageDType::F64 | StorageDType::I64 => 8,
            StorageDType::F32 | StorageDType::I32 => 4,
            StorageDType::F16 | StorageDType::BF16 | StorageDType::I16 => 2,
            StorageDType::I8 | StorageDType::U8 | StorageDType::Bool => 1,
        }
    }

    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => StorageDType::F32,
            "DoubleStorage" => StorageDType::F64,
            "HalfStorage" => StorageDType::F16,
            "BFloat16Storage" => StorageDType::BF16,
            "LongStorage" => StorageDType::I64,
            "IntStorage" => StorageDType::I32,
            "ShortStorage" => StorageDType::I16,
            "CharStorage" => StorageDType::I8,
            "ByteStorage" => StorageDType::U8,
            "BoolStorage" => StorageDType::Bool,
            _ => return None,
        })
    }
}

/// A storage referenced by a persistent id: its bytes are the archive entry `data/<key>`.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: StorageDType,
    /// Number of elements (not bytes).
    pub numel: usize,
    pub location: String,
}

/// A strided view into a storage, as `torch._utils._rebuild_tensor_v2` describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    /// Offset in elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    /// Strides in elements.
    pub stride: Vec<usize>,
}

/// The allow-listed globals, the only callables a pickle may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Callable {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    /// A storage class; only meaningful inside a persistent id.
    Storage(StorageDType),
}

/// A decoded pickle value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Insertion-ordered key/value pairs (dicts and OrderedDicts alike).
    Dict(Vec<(Value, Value)>),
    Callable(Callable),
    Storage(StorageRef),
    Tensor(TensorRef),
}

impl Value {
    /// Short type name for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Callable(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    /// The value stored under the string key `key` of a dict (the last one, as Python would keep).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().rev().find_map(|(k, v)| match k {
                Value::Str(s) if s == key => Some(v),
                _ => None,
            }),
            _ => None,
        }
    }
}

/// Upper bound on nesting when converting to a [`Value`] tree.
const MAX_DEPTH: usize = 128;

type Id = usize;

/// Arena object: like [`Value`] but containers hold arena ids.
enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Callable(Callable),
    Storage(StorageRef),
    Tensor(TensorRef),
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    objs: Vec<Obj>,
    stack: Vec<Id>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
}

/// Parse a pickle. Errors are plain messages (the caller adds the file name).
pub fn parse(data: &[u8]) -> Result<Value, String> {
    let mut vm = Vm {
        data,
        pos: 0,
        objs: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let root = vm.run()?;
    // Each opcode creates at most one object, so a legitimate tree is rarely much larger than the
    // arena; the budget only stops exponential expansion of shared references.
    let mut budget = vm.objs.len().saturating_mul(16).saturating_add(1024);
    vm.to_value(root, 0, &mut budget)
}

fn resolve_global(module: &str, name: &str) -> Result<Callable, String> {
    let c = match (module, name) {
        ("collections", "OrderedDict") => Callable::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Callable::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Callable::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Callable::RebuildParameterWithState,
        ("torch", class) => match StorageDType::from_class(class) {
            Some(dt) => Callable::Storage(dt),
            None => return Err(format!("refusing unknown pickle global `{module}.{name}`")),
        },
        _ => return Err(format!("refusing unknown pickle global `{module}.{name}`")),
    };
    Ok(c)
}

impl<'a> Vm<'a> {
    fn run(&mut self) -> Result<Id, String> {
        loop {
            let at = self.pos;
            let op = self.byte().map_err(|_| "pickle ends without STOP".to_string())?;
            self.step(op)
                .map_err(|e| format!("pickle opcode 0x{op:02x} at byte {at}: {e}"))?;
            if op == b'.' {
                return self.pop();
            }
        }
    }

    fn step(&mut self, op: u8) -> Result<(), String> {
        match op {
            0x80 => {
                // PROTO
                let v = self.byte()?;
                if v > 5 {
                    return Err(format!("unsupported pickle protocol {v}"));
                }
            }
            0x95 => {
                // FRAME: a length hint only
                self.take(8)?;
            }
            b'.' => {} // STOP: handled by run()
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let top = *self.stack.last().ok_or("DUP on an empty stack")?;
                self.stack.push(top);
            }
            b'N' => self.push(Obj::None),
            0x88 => self.push(Obj::Bool(true)),
            0x89 => self.push(Obj::Bool(false)),
            b'K' => {
                let v = self.byte()? as i64;
                self.push(Obj::Int(v));
            }
            b'M' => {
                let b = self.take(2)?;
                let v = u16::from_le_bytes([b[0], b[1]]) as i64;
                self.push(Obj::Int(v));
            }
            b'J' => {
                let b = self.take(4)?;
                let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64;
                self.push(Obj::Int(v));
            }
            0x8a | 0x8b => {
                // LONG1 / LONG4: little-endian two's complement of n bytes
                let n = if op == 0x8a {
                    self.byte()? as usize
                } else {
                    self.u32()? as usize
                };
                let b = self.take(n)?;
                self.push(Obj::Int(long_from_bytes(b)?));
            }
            b'G' => {
                let b = self.take(8)?;
                let v = f64::from_be_bytes(b.try_into().map_err(|_| "short float")?);
                self.push(Obj::Float(v));
            }
            b'X' => {
                let n = self.u32()? as usize;
                let s = self.utf8(n)?;
                self.push(Obj::Str(s));
            }
            0x8c => {
                let n = self.byte()? as usize;
                let s = self.utf8(n)?;
                self.push(Obj::Str(s));
            }
            0x8d => {
                let n = self.u64()?;
                let n = usize::try_from(n).map_err(|_| "string length overflows")?;
                let s = self.utf8(n)?;
                self.push(Obj::Str(s));
            }
            b'B' | b'C' => {
                let n = if op == b'B' {
                    self.u32()? as usize
                } else {
                    self.byte()? as usize
                };
                let b = self.take(n)?.to_vec();
                self.push(Obj::Bytes(b));
            }
            b'}' => self.push(Obj::Dict(Vec::new())),
            b']' => self.push(Obj::List(Vec::new())),
            b')' => self.push(Obj::Tuple(Vec::new())),
            b'd' => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    return Err("DICT with an odd number of items".into());
                }
                let pairs = items.chunks_exact(2).map(|c| (c[0], c[1])).collect();
                self.push(Obj::Dict(pairs));
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Obj::List(items));
            }
            b't' => {
                let items = self.pop_mark()?;
                self.push(Obj::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n + self.floor() {
                    return Err("stack underflow".into());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.push(Obj::Tuple(items));
            }
            b'q' => {
                let k = self.byte()? as u64;
                self.memo_put(k)?;
            }
            b'r' => {
                let k = self.u32()? as u64;
                self.memo_put(k)?;
            }
            0x94 => {
                let k = self.memo.len() as u64;
                self.memo_put(k)?;
            }
            b'h' => {
                let k = self.byte()? as u64;
                self.memo_get(k)?;
            }
            b'j' => {
                let k = self.u32()? as u64;
                self.memo_get(k)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let c = resolve_global(&module, &name)?;
                self.push(Obj::Callable(c));
            }
            0x93 => {
                // STACK_GLOBAL
                let name = self.pop()?;
                let module = self.pop()?;
                let (Obj::Str(module), Obj::Str(name)) = (&self.objs[module], &self.objs[name]) else {
                    return Err("STACK_GLOBAL needs two strings".into());
                };
                let c = resolve_global(module, name)?;
                self.push(Obj::Callable(c));
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                let d = self.top()?;
                match &mut self.objs[d] {
                    Obj::Dict(items) => items.push((k, v)),
                    _ => return Err("SETITEM on a non-dict".into()),
                }
            }
            b'u' => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    return Err("SETITEMS with an odd number of items".into());
                }
                let d = self.top()?;
                match &mut self.objs[d] {
                    Obj::Dict(dst) => dst.extend(items.chunks_exact(2).map(|c| (c[0], c[1]))),
                    _ => return Err("SETITEMS on a non-dict".into()),
                }
            }
            b'a' => {
                let v = self.pop()?;
                let l = self.top()?;
                match &mut self.objs[l] {
                    Obj::List(items) => items.push(v),
                    _ => return Err("APPEND on a non-list".into()),
                }
            }
            b'e' => {
                let items = self.pop_mark()?;
                let l = self.top()?;
                match &mut self.objs[l] {
                    Obj::List(dst) => dst.extend(items),
                    _ => return Err("APPENDS on a non-list".into()),
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                let s = self.persistent_storage(pid)?;
                self.push(Obj::Storage(s));
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                let obj = self.reduce(func, args)?;
                self.push(obj);
            }
            b'b' => {
                // BUILD: state for OrderedDict (`_metadata`) or tensor attributes; neither matters
                // for the weights, and nothing else may be built.
                self.pop()?;
                let target = self.top()?;
                if !matches!(self.objs[target], Obj::Dict(_) | Obj::Tensor(_)) {
                    return Err("BUILD on an object that is neither a dict nor a tensor".into());
                }
            }
            _ => return Err("unsupported opcode".into()),
        }
        Ok(())
    }

    /// `torch.save` persistent id: ('storage', <StorageClass>, key, location, numel).
    fn persistent_storage(&self, pid: Id) -> Result<StorageRef, String> {
        let Obj::Tuple(items) = &self.objs[pid] else {
            return Err("persistent id is not a tuple".into());
        };
        let objs: Vec<&Obj> = items.iter().map(|&i| &self.objs[i]).collect();
        match objs[..] {
            [Obj::Str(kind), Obj::Callable(Callable::Storage(dtype)), Obj::Str(key), Obj::Str(location), Obj::Int(numel)]
                if kind == "storage" =>
            {
                let numel = usize::try_from(*numel).map_err(|_| "negative storage size")?;
                Ok(StorageRef {
                    key: key.clone(),
                    dtype: *dtype,
                    numel,
                    location: location.clone(),
                })
            }
            _ => Err("persistent id is not ('storage', StorageClass, key, location, numel)".into()),
        }
    }

    fn reduce(&self, func: Id, args: Id) -> Result<Obj, String> {
        let Obj::Callable(c) = self.objs[func] else {
            return Err("REDUCE on something that is not an allowed global".into());
        };
        let Obj::Tuple(args) = &self.objs[args] else {
            return Err("REDUCE arguments are not a tuple".into());
        };
        let args: Vec<&Obj> = args.iter().map(|&i| &self.objs[i]).collect();
        match c {
            Callable::OrderedDict => {
                if !args.is_empty() {
                    return Err("OrderedDict called with arguments".into());
                }
                Ok(Obj::Dict(Vec::new()))
            }
            Callable::RebuildTensorV2 => {
                // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
                if args.len() < 4 {
                    return Err("_rebuild_tensor_v2 needs at least 4 arguments".into());
                }
                let Obj::Storage(storage) = args[0] else {
                    return Err("_rebuild_tensor_v2: first argument is not a storage".into());
                };
                let Obj::Int(offset) = *args[1] else {
                    return Err("_rebuild_tensor_v2: storage offset is not an int".into());
                };
                let offset = usize::try_from(offset).map_err(|_| "negative storage offset")?;
                let shape = self
                    .usize_tuple(args[2])
                    .ok_or("_rebuild_tensor_v2: bad size tuple")?;
                let stride = self
                    .usize_tuple(args[3])
                    .ok_or("_rebuild_tensor_v2: bad stride tuple")?;
                if shape.len() != stride.len() {
                    return Err(format!("tensor with size {shape:?} but stride {stride:?}"));
                }
                Ok(Obj::Tensor(TensorRef {
                    storage: storage.clone(),
                    offset,
                    shape,
                    stride,
                }))
            }
            Callable::RebuildParameter | Callable::RebuildParameterWithState => match args.first() {
                // (data, requires_grad, backward_hooks[, state]): a Parameter is its data here
                Some(Obj::Tensor(t)) => Ok(Obj::Tensor(t.clone())),
                _ => Err("_rebuild_parameter: first argument is not a tensor".into()),
            },
            Callable::Storage(_) => Err("a storage class cannot be called".into()),
        }
    }

    fn usize_tuple(&self, obj: &Obj) -> Option<Vec<usize>> {
        let Obj::Tuple(items) = obj else { return None };
        items
            .iter()
            .map(|&i| match self.objs[i] {
                Obj::Int(v) => usize::try_from(v).ok(),
                _ => None,
            })
            .collect()
    }

    fn to_value(&self, id: Id, depth: usize, budget: &mut usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err("pickle nests too deeply (or is cyclic)".into());
        }
        if *budget == 0 {
            return Err("pickle expands to too many objects".into());
        }
        *budget -= 1;
        let list = |ids: &[Id], budget: &mut usize| -> Result<Vec<Value>, String> {
            ids.iter().map(|&i| self.to_value(i, depth + 1, budget)).collect()
        };
        Ok(match &self.objs[id] {
            Obj::None => Value::None,
            Obj::Bool(b) => Value::Bool(*b),
            Obj::Int(v) => Value::Int(*v),
            Obj::Float(v) => Value::Float(*v),
            Obj::Str(s) => Value::Str(s.clone()),
            Obj::Bytes(b) => Value::Bytes(b.clone()),
            Obj::Tuple(ids) => Value::Tuple(list(ids, budget)?),
            Obj::List(ids) => Value::List(list(ids, budget)?),
            Obj::Dict(pairs) => Value::Dict(
                pairs
                    .iter()
                    .map(|&(k, v)| {
                        Ok((
                            self.to_value(k, depth + 1, budget)?,
                            self.to_value(v, depth + 1, budget)?,
                        ))
                    })
                    .collect::<Result<_, String>>()?,
            ),
            Obj::Callable(c) => Value::Callable(*c),
            Obj::Storage(s) => Value::Storage(s.clone()),
            Obj::Tensor(t) => Value::Tensor(t.clone()),
        })
    }

    // --- stack, memo and byte helpers ---

    fn push(&mut self, obj: Obj) {
        self.objs.push(obj);
        self.stack.push(self.objs.len() - 1);
    }

    /// The lowest stack index the current MARK frame may touch.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Id, String> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }

    fn top(&self) -> Result<Id, String> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow".into());
        }
        self.stack.last().copied().ok_or_else(|| "stack underflow".into())
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>, String> {
        let m = self.marks.pop().ok_or("no MARK on the stack")?;
        if m > self.stack.len() {
            return Err("MARK above the stack top".into());
        }
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, k: u64) -> Result<(), String> {
        let top = self.top()?;
        self.memo.insert(k, top);
        Ok(())
    }

    fn memo_get(&mut self, k: u64) -> Result<(), String> {
        let id = *self.memo.get(&k).ok_or_else(|| format!("memo key {k} not set"))?;
        self.stack.push(id);
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or("pickle is truncated")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| "short u64")?))
    }

    fn utf8(&mut self, n: usize) -> Result<String, String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8".to_string())
    }

    /// A newline-terminated ASCII line (GLOBAL's operands).
    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .take(256)
            .position(|&b| b == b'\n')
            .ok_or("unterminated GLOBAL name")?;
        let s = self.take(n)?;
        self.pos += 1; // the newline
        let s = std::str::from_utf8(s).map_err(|_| "GLOBAL name is not UTF-8")?;
        Ok(s.to_string())
    }
}

/// Python's little-endian two's-complement long encoding; only values that fit an i64.
fn long_from_bytes(b: &[u8]) -> Result<i64, String> {
    if b.is_empty() {
        return Ok(0);
    }
    if b.len() > 8 {
        return Err(format!("integer of {} bytes does not fit 64 bits", b.len()));
    }
    let fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
    let mut buf = [fill; 8];
    buf[..b.len()].copy_from_slice(b);
    Ok(i64::from_le_bytes(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nested_containers_with_memo_sharing() {
        // {'a': [1, -2, 3.5], 'b': <the same list>} built with BINPUT/BINGET after APPENDS.
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'(', b'X'];
        p.extend(1u32.to_le_bytes());
        p.extend(b"a]q\x01(K\x01J");
        p.extend((-2i32).to_le_bytes());
        p.push(b'G');
        p.extend(3.5f64.to_be_bytes());
        p.extend(b"e\x8c\x01bh\x01u.");
        let v = parse(&p).unwrap();
        let l = Value::List(vec![Value::Int(1), Value::Int(-2), Value::Float(3.5)]);
        assert_eq!(v.get("a"), Some(&l));
        assert_eq!(v.get("b"), Some(&l));
    }

    #[test]
    fn refuses_unknown_globals_and_bad_streams() {
        let e = parse(b"\x80\x02cos\nsystem\nq\x00.").unwrap_err();
        assert!(e.contains("refusing unknown pickle global `os.system`"), "{e}");
        let e = parse(b"\x80\x02ctorch\nload\n.").unwrap_err();
        assert!(e.contains("`torch.load`"), "{e}");
        assert!(parse(b"\x80\x02}").unwrap_err().contains("without STOP"));
        assert!(parse(b"\x80\x02u.").is_err()); // SETITEMS without mark
        assert!(parse(b"\x80\x02h\x05.").is_err()); // unset memo
        assert!(parse(b"\x80\x02X\xff\xff\xff\xff").is_err()); // length past the end
        assert!(parse(b"\x80\x02(K\x01\x86.").is_err()); // TUPLE2 across a MARK
    }

    #[test]
    fn long1_sign_extends() {
        assert_eq!(long_from_bytes(&[0xff]).unwrap(), -1);
        assert_eq!(long_from_bytes(&[0x00, 0x01]).unwrap(), 256);
        assert_eq!(long_from_bytes(&[]).unwrap(), 0);
        assert!(long_from_bytes(&[0; 9]).is_err());
    }

    #[test]
    fn cyclic_structures_are_rejected_not_looped() {
        // l = []; l.append(l)
        let v = parse(b"\x80\x02]q\x00h\x00a.");
        assert!(v.unwrap_err().contains("too deeply"));
    }
}
