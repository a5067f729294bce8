//! The adapter directory: `adapter_config.json` plus `adapter.safetensors`.
//!
//! Tensor names are `shared.<group>.encoder` (r_e x in), `shared.<group>.decoder` (out x r_d) and
//! `<module path>.m` (r_d x r_e). Every shared tensor is stored once. The config's `groups` object
//! maps each adapted module path to its group; reading checks that tensors and config agree exactly.
//!
//! A *tenant* stores only its cores: its config has a `basis` object, `{"fingerprint": <32 hex>,
//! "groups": {group: [in, out, encoder_rank, decoder_rank]}}`, naming the basis (the shared tensors
//! of some full adapter) it needs; its group layouts come from there instead of from shared tensors.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{Map, Value};

use crate::activation::Activation;
use crate::atomic::write_atomically;
use crate::error::{Error, Result};
use crate::open::OpenAdapter;
use crate::safetensors_io::save_safetensors;
use crate::tensor::{Tensor, TensorRef};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const TENSORS_FILE: &str = "adapter.safetensors";
/// Version of the adapter layout written for full adapters (shared tensors and cores).
pub const FORMAT_VERSION: u64 = 1;
/// Version written for tenants (cores only, `basis` in the config); the newest this library reads.
pub const TENANT_FORMAT_VERSION: u64 = 2;
/// The config key of a tenant's basis.
pub const BASIS_KEY: &str = "basis";

/// `config` as it is written, stamped with its `format_version`: tenants 2, full adapters 1 (so
/// that readers older than tenants keep reading full adapters). The one place a version is chosen.
pub fn stamped(config: &Map<String, Value>) -> Map<String, Value> {
    let version = if config.contains_key(BASIS_KEY) { TENANT_FORMAT_VERSION } else { FORMAT_VERSION };
    let mut config = config.clone();
    config.insert("format_version".into(), Value::from(version));
    config
}

/// An adapter config: the JSON object of `adapter_config.json`. The core reads only the keys it
/// needs (`groups`, `format_version`, and what the algebra consults); the rest passes through.
pub type ConfigMap = Map<String, Value>;

pub fn encoder_key(group: &str) -> String {
    format!("shared.{group}.encoder")
}

pub fn decoder_key(group: &str) -> String {
    format!("shared.{group}.decoder")
}

pub fn m_key(module: &str) -> String {
    format!("{module}.m")
}

/// An adapter held in memory: its config object and its tensors by name.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub config: Map<String, Value>,
    pub tensors: BTreeMap<String, Tensor>,
}

/// The shape of one group as derived from an adapter's tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLayout {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    /// Rows of the encoder (latent width after the encoder).
    pub encoder_rank: usize,
    /// Columns of the decoder (latent width before the decoder).
    pub decoder_rank: usize,
    /// Adapted module paths of this group, sorted.
    pub modules: Vec<String>,
}

/// `groups` of a config: module path -> group name.
pub fn config_groups(config: &Map<String, Value>, context: &str) -> Result<BTreeMap<String, String>> {
    let groups = config
        .get("groups")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::incompatible(context, "config has no \"groups\" object (module path -> group)"))?;
    let mut out = BTreeMap::new();
    for (module, group) in groups {
        let group = group
            .as_str()
            .ok_or_else(|| Error::incompatible(context, format!("group of module {module:?} is not a string")))?;
        out.insert(module.clone(), group.to_string());
    }
    if out.is_empty() {
        return Err(Error::incompatible(context, "config adapts no module (\"groups\" is empty)"));
    }
    Ok(out)
}

/// (encoder side, decoder side) activations of a config; the per-side keys override
/// `activation`, which defaults to GELU as in the config class.
pub fn config_activations(config: &ConfigMap, context: &str) -> Result<(Activation, Activation)> {
    let name = |key: &str| -> Result<Option<&str>> {
        match config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(Error::incompatible(context, format!("config {key:?} is {other}, not a string"))),
        }
    };
    let both = name("activation")?.unwrap_or("gelu");
    let parse = |key: &str| -> Result<Activation> {
        name(key)?.unwrap_or(both).parse().map_err(|m: String| Error::incompatible(context, m))
    };
    Ok((parse("encoder_activation")?, parse("decoder_activation")?))
}

fn matrix_shape(tensors: &BTreeMap<String, TensorRef<'_>>, key: &str, context: &str) -> Result<(usize, usize)> {
    let t = tensors.get(key).ok_or_else(|| Error::incompatible(context, format!("tensor {key:?} is missing")))?;
    match t.shape {
        [rows, cols] if *rows > 0 && *cols > 0 => Ok((*rows, *cols)),
        shape => Err(Error::incompatible(
            context,
            format!("tensor {key:?} has shape {shape:?}; expected a non-empty matrix"),
        )),
    }
}

/// A tenant's basis as its config names it: the fingerprint and each group's
/// `[in_features, out_features, encoder_rank, decoder_rank]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasisRef {
    pub fingerprint: String,
    pub groups: BTreeMap<String, [usize; 4]>,
}

/// The basis a tenant's config names; `None` for a full adapter.
pub fn config_basis(config: &Map<String, Value>, context: &str) -> Result<Option<BasisRef>> {
    let Some(basis) = config.get(BASIS_KEY) else { return Ok(None) };
    let bad = |m: String| Error::incompatible(context, format!("config \"{BASIS_KEY}\" {m}"));
    let basis = basis.as_object().ok_or_else(|| bad(format!("is {basis}, not an object")))?;
    let fingerprint = match basis.get("fingerprint") {
        Some(Value::String(f))
            if f.len() == 32 && f.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            f.clone()
        }
        other => return Err(bad(format!("has fingerprint {other:?}; expected 32 lowercase hex digits"))),
    };
    let groups = basis
        .get("groups")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("has no \"groups\" object (group -> [in, out, encoder_rank, decoder_rank])".into()))?;
    let mut out = BTreeMap::new();
    for (group, dims) in groups {
        let parsed: Option<Vec<usize>> = dims
            .as_array()
            .map(|a| a.iter().map(|d| d.as_u64().filter(|&d| d > 0).map(|d| d as usize)).collect::<Option<_>>())
            .unwrap_or(None);
        match parsed.as_deref() {
            Some(&[i, o, e, d]) => {
                out.insert(group.clone(), [i, o, e, d]);
            }
            _ => {
                return Err(bad(format!(
                "gives group {group:?} as {dims}; expected [in, out, encoder_rank, decoder_rank] of positive integers"
            )))
            }
        }
    }
    Ok(Some(BasisRef { fingerprint, groups: out }))
}

/// Check that `tensors` are exactly what `config` promises and return each group's layout.
/// `context` names the adapter (its path or bundle entry) in errors. A tenant (a config with
/// `basis`) holds exactly one core per module, shaped by its group in `basis.groups`, and no
/// shared tensor.
pub fn validate_layout(
    config: &Map<String, Value>,
    tensors: &BTreeMap<String, TensorRef<'_>>,
    context: &str,
) -> Result<Vec<GroupLayout>> {
    let groups = config_groups(config, context)?;
    let mut by_group: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (module, group) in &groups {
        by_group.entry(group.as_str()).or_default().push(module.clone());
    }
    if let Some(basis) = config_basis(config, context)? {
        return validate_tenant_layout(by_group, &basis.groups, tensors, context);
    }
    let mut expected: BTreeSet<String> = BTreeSet::new();
    let mut layouts = Vec::with_capacity(by_group.len());
    for (group, modules) in by_group {
        let (enc_rank, in_features) = matrix_shape(tensors, &encoder_key(group), context)?;
        let (out_features, dec_rank) = matrix_shape(tensors, &decoder_key(group), context)?;
        expected.insert(encoder_key(group));
        expected.insert(decoder_key(group));
        for module in &modules {
            expected.insert(check_m_shape(tensors, module, group, (dec_rank, enc_rank), context)?);
        }
        layouts.push(GroupLayout {
            name: group.to_string(),
            in_features,
            out_features,
            encoder_rank: enc_rank,
            decoder_rank: dec_rank,
            modules,
        });
    }
    if let Some(extra) = tensors.keys().find(|k| !expected.contains(*k)) {
        return Err(Error::incompatible(
            context,
            format!("tensor {extra:?} belongs to no module or group named in the config"),
        ));
    }
    Ok(layouts)
}

fn check_m_shape(
    tensors: &BTreeMap<String, TensorRef<'_>>,
    module: &str,
    group: &str,
    (dec_rank, enc_rank): (usize, usize),
    context: &str,
) -> Result<String> {
    let key = m_key(module);
    let shape = matrix_shape(tensors, &key, context)?;
    if shape != (dec_rank, enc_rank) {
        return Err(Error::incompatible(
            format!("{context}: module {module}"),
            format!(
                "tensor {key:?} has shape {:?}, but group {group:?} needs [{dec_rank}, {enc_rank}] \
                 (decoder columns x encoder rows)",
                [shape.0, shape.1]
            ),
        ));
    }
    Ok(key)
}

fn validate_tenant_layout(
    by_group: BTreeMap<&str, Vec<String>>,
    basis_groups: &BTreeMap<String, [usize; 4]>,
    tensors: &BTreeMap<String, TensorRef<'_>>,
    context: &str,
) -> Result<Vec<GroupLayout>> {
    if let Some(shared) = tensors.keys().find(|k| k.starts_with("shared.")) {
        return Err(Error::incompatible(
            context,
            format!("tensor {shared:?} is a shared tensor; a tenant stores only its cores (its basis holds the rest)"),
        ));
    }
    if let Some(unused) = basis_groups.keys().find(|g| !by_group.contains_key(g.as_str())) {
        return Err(Error::incompatible(
            context,
            format!("basis group {unused:?} is the group of no module in \"groups\""),
        ));
    }
    let mut expected: BTreeSet<String> = BTreeSet::new();
    let mut layouts = Vec::with_capacity(by_group.len());
    for (group, modules) in by_group {
        let &[in_features, out_features, enc_rank, dec_rank] = basis_groups.get(group).ok_or_else(|| {
            Error::incompatible(
                format!("{context}: module {}", modules[0]),
                format!("group {group:?} is missing from the config's basis groups"),
            )
        })?;
        for module in &modules {
            expected.insert(check_m_shape(tensors, module, group, (dec_rank, enc_rank), context)?);
        }
        layouts.push(GroupLayout {
            name: group.to_string(),
            in_features,
            out_features,
            encoder_rank: enc_rank,
            decoder_rank: dec_rank,
            modules,
        });
    }
    if let Some(extra) = tensors.keys().find(|k| !expected.contains(*k)) {
        return Err(Error::incompatible(context, format!("tensor {extra:?} belongs to no module named in the config")));
    }
    Ok(layouts)
}

/// Whether this library reads a stored config's `format_version` (the message says why not).
pub fn check_format_version(config: &Map<String, Value>) -> std::result::Result<(), String> {
    match config.get("format_version").and_then(Value::as_u64) {
        Some(v) if v <= TENANT_FORMAT_VERSION => Ok(()),
        Some(v) => Err(format!(
            "format_version {v} is newer than this library reads ({TENANT_FORMAT_VERSION}); upgrade denselora"
        )),
        None => Err("missing or non-integer \"format_version\"".into()),
    }
}

/// Parse JSON text that must be an object (named `path` in errors), without version checks.
pub fn parse_config_object(text: &str, path: &Path) -> Result<ConfigMap> {
    let value: Value = serde_json::from_str(text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
    match value {
        Value::Object(config) => Ok(config),
        _ => Err(Error::format(path, "the config must be a JSON object")),
    }
}

/// Parse the text of a stored `adapter_config.json` (named `path` in errors).
pub fn parse_config(text: &str, path: &Path) -> Result<ConfigMap> {
    let config = parse_config_object(text, path)?;
    check_format_version(&config).map_err(|m| Error::format(path, m))?;
    Ok(config)
}

/// A config as pretty JSON text with a trailing newline.
pub fn config_to_string(config: &ConfigMap) -> String {
    let mut text = serde_json::to_string_pretty(config).expect("JSON map");
    text.push('\n');
    text
}

/// Read and validate an adapter directory into memory (`OpenAdapter::open_dir` maps it instead).
pub fn read_adapter_dir(dir: &Path) -> Result<Adapter> {
    Ok(OpenAdapter::open_dir(dir)?.to_adapter())
}

/// Write an adapter directory (created if needed). The layout is validated first, so an
/// inconsistent adapter is never written; each file is replaced atomically, tensors first.
pub fn write_adapter_dir(
    dir: &Path,
    config: &Map<String, Value>,
    tensors: &BTreeMap<String, TensorRef<'_>>,
) -> Result<()> {
    let config = stamped(config);
    validate_layout(&config, tensors, &dir.display().to_string())?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let named: Vec<(&str, TensorRef<'_>)> = tensors.iter().map(|(k, t)| (k.as_str(), *t)).collect();
    let version = config["format_version"].to_string();
    let metadata =
        BTreeMap::from([("format".to_string(), "denselora".to_string()), ("format_version".to_string(), version)]);
    save_safetensors(&dir.join(TENSORS_FILE), &named, &metadata)?;
    let config_path = dir.join(CONFIG_FILE);
    let text = config_to_string(&config);
    write_atomically(&config_path, |w| {
        std::io::Write::write_all(w, text.as_bytes()).map_err(|e| Error::io(&config_path, e))
    })
}

impl Adapter {
    pub fn views(&self) -> BTreeMap<String, TensorRef<'_>> {
        self.tensors.iter().map(|(k, t)| (k.clone(), t.view())).collect()
    }

    pub fn layout(&self, context: &str) -> Result<Vec<GroupLayout>> {
        validate_layout(&self.config, &self.views(), context)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        write_adapter_dir(dir, &self.config, &self.views())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dtype::DType;

    /// A two-group adapter: q (8 -> 8, two layers) and up (8 -> 12, one layer), rank 4.
    pub fn sample_adapter() -> Adapter {
        let mut tensors = BTreeMap::new();
        let fill = |n: usize, seed: f32| (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect::<Vec<_>>();
        tensors.insert(encoder_key("q_proj"), Tensor::from_f32(DType::F32, vec![4, 8], &fill(32, 1.0)));
        tensors.insert(decoder_key("q_proj"), Tensor::from_f32(DType::F32, vec![8, 4], &fill(32, 2.0)));
        tensors.insert(encoder_key("up_proj"), Tensor::from_f32(DType::F32, vec![4, 8], &fill(32, 3.0)));
        tensors.insert(decoder_key("up_proj"), Tensor::from_f32(DType::F32, vec![12, 4], &fill(48, 4.0)));
        let mut groups = Map::new();
        for (i, (module, group)) in [
            ("model.layers.0.self_attn.q_proj", "q_proj"),
            ("model.layers.1.self_attn.q_proj", "q_proj"),
            ("model.layers.0.mlp.up_proj", "up_proj"),
        ]
        .into_iter()
        .enumerate()
        {
            tensors.insert(m_key(module), Tensor::from_f32(DType::F32, vec![4, 4], &fill(16, 5.0 + i as f32)));
            groups.insert(module.into(), Value::from(group));
        }
        let mut config = Map::new();
        config.insert("r".into(), Value::from(4));
        config.insert("activation".into(), Value::from("gelu"));
        config.insert("groups".into(), Value::Object(groups));
        config.insert("format_version".into(), Value::from(FORMAT_VERSION));
        Adapter { config, tensors }
    }

    #[test]
    fn write_then_read_is_identical() {
        let dir = tempfile::tempdir().unwrap();
        let adapter = sample_adapter();
        adapter.write(dir.path()).unwrap();
        let back = read_adapter_dir(dir.path()).unwrap();
        assert_eq!(back, adapter);
        let layout = back.layout("x").unwrap();
        assert_eq!(layout.len(), 2);
        assert_eq!(layout[1].out_features, 12);
        assert_eq!(layout[0].modules.len(), 2);
    }

    #[test]
    fn file_size_is_parameters_times_bytes_plus_small_header() {
        let dir = tempfile::tempdir().unwrap();
        let adapter = sample_adapter();
        adapter.write(dir.path()).unwrap();
        let params: usize = adapter.tensors.values().map(|t| t.shape.iter().product::<usize>()).sum();
        let size = std::fs::metadata(dir.path().join(TENSORS_FILE)).unwrap().len() as usize;
        assert!(size >= params * 4 && size < params * 4 + 2048, "{size} vs {params} params");
    }

    #[test]
    fn missing_module_tensor_is_named() {
        let mut adapter = sample_adapter();
        adapter.tensors.remove(&m_key("model.layers.1.self_attn.q_proj"));
        let err = adapter.layout("adapter-x").unwrap_err();
        assert!(matches!(err, Error::Incompatible { .. }));
        assert!(err.to_string().contains("model.layers.1.self_attn.q_proj.m"), "{err}");
    }

    #[test]
    fn extra_tensor_is_named() {
        let mut adapter = sample_adapter();
        adapter.tensors.insert("stray".into(), Tensor::from_f32(DType::F32, vec![1, 1], &[0.0]));
        let err = adapter.layout("adapter-x").unwrap_err();
        assert!(err.to_string().contains("stray"), "{err}");
    }

    #[test]
    fn wrong_m_shape_is_named() {
        let mut adapter = sample_adapter();
        adapter
            .tensors
            .insert(m_key("model.layers.0.mlp.up_proj"), Tensor::from_f32(DType::F32, vec![3, 4], &[0.0; 12]));
        let err = adapter.layout("adapter-x").unwrap_err();
        assert!(err.to_string().contains("model.layers.0.mlp.up_proj"), "{err}");
    }

    #[test]
    fn invalid_adapter_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut adapter = sample_adapter();
        adapter.tensors.remove(&decoder_key("q_proj"));
        assert!(adapter.write(dir.path()).is_err());
        assert!(!dir.path().join(TENSORS_FILE).exists());
    }

    #[test]
    fn newer_format_version_and_bad_json_are_format_errors() {
        let dir = tempfile::tempdir().unwrap();
        sample_adapter().write(dir.path()).unwrap();
        let cfg = dir.path().join(CONFIG_FILE);
        std::fs::write(&cfg, r#"{"format_version": 99, "groups": {}}"#).unwrap();
        assert!(matches!(read_adapter_dir(dir.path()), Err(Error::Format { .. })));
        std::fs::write(&cfg, "{not json").unwrap();
        let err = read_adapter_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains(CONFIG_FILE), "{err}");
    }

    /// The tenant of `sample_adapter`: its cores and a config naming its basis.
    pub fn sample_tenant() -> Adapter {
        let mut adapter = sample_adapter();
        adapter.tensors.retain(|k, _| !k.starts_with("shared."));
        let basis = serde_json::json!({
            "fingerprint": "0123456789abcdef0123456789abcdef",
            "groups": {"q_proj": [8, 8, 4, 4], "up_proj": [8, 12, 4, 4]},
        });
        adapter.config.insert(BASIS_KEY.into(), basis);
        adapter.config.insert("format_version".into(), Value::from(TENANT_FORMAT_VERSION));
        adapter
    }

    fn tenant_error(edit: impl FnOnce(&mut Adapter)) -> String {
        let mut tenant = sample_tenant();
        edit(&mut tenant);
        let err = tenant.layout("tenant-x").unwrap_err();
        assert!(matches!(err, Error::Incompatible { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains("tenant-x"), "{message}");
        message
    }

    #[test]
    fn a_tenant_takes_its_layout_from_the_basis_and_is_written_as_version_2() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = sample_tenant();
        let layout = tenant.layout("t").unwrap();
        assert_eq!(layout, sample_adapter().layout("t").unwrap());
        tenant.write(dir.path()).unwrap();
        let back = read_adapter_dir(dir.path()).unwrap();
        assert_eq!(back, tenant);
        assert_eq!(back.config["format_version"], Value::from(2));
        assert_eq!(stamped(&back.config)["format_version"], Value::from(TENANT_FORMAT_VERSION));
        // A full adapter keeps version 1, even when handed a config stamped otherwise.
        let mut full = sample_adapter();
        full.config.insert("format_version".into(), Value::from(2));
        full.write(dir.path()).unwrap();
        assert_eq!(read_adapter_dir(dir.path()).unwrap().config["format_version"], Value::from(FORMAT_VERSION));
    }

    #[test]
    fn a_tenant_layout_error_names_the_tensor_or_group() {
        let shared = tenant_error(|t| {
            let e = sample_adapter().tensors[&encoder_key("q_proj")].clone();
            t.tensors.insert(encoder_key("q_proj"), e);
        });
        assert!(shared.contains("shared.q_proj.encoder") && shared.contains("only its cores"), "{shared}");
        let missing = tenant_error(|t| {
            t.tensors.remove(&m_key("model.layers.1.self_attn.q_proj"));
        });
        assert!(missing.contains("model.layers.1.self_attn.q_proj.m") && missing.contains("missing"), "{missing}");
        let shape = tenant_error(|t| {
            t.tensors.insert(m_key("model.layers.0.mlp.up_proj"), Tensor::from_f32(DType::F32, vec![4, 3], &[0.0; 12]));
        });
        assert!(shape.contains("model.layers.0.mlp.up_proj.m") && shape.contains("[4, 4]"), "{shape}");
        let stray = tenant_error(|t| {
            t.tensors
                .insert("model.layers.9.mlp.up_proj.m".into(), Tensor::from_f32(DType::F32, vec![4, 4], &[0.0; 16]));
        });
        assert!(stray.contains("model.layers.9.mlp.up_proj.m") && stray.contains("no module"), "{stray}");
        let group = tenant_error(|t| {
            t.config[BASIS_KEY]["groups"].as_object_mut().unwrap().remove("up_proj");
        });
        assert!(group.contains("\"up_proj\"") && group.contains("model.layers.0.mlp.up_proj"), "{group}");
        let unused = tenant_error(|t| {
            t.config[BASIS_KEY]["groups"]["v_proj"] = serde_json::json!([8, 8, 4, 4]);
        });
        assert!(unused.contains("\"v_proj\""), "{unused}");
        let dims = tenant_error(|t| t.config[BASIS_KEY]["groups"]["q_proj"] = serde_json::json!([8, 8, 4]));
        assert!(dims.contains("q_proj") && dims.contains("encoder_rank"), "{dims}");
        let zero = tenant_error(|t| t.config[BASIS_KEY]["groups"]["q_proj"] = serde_json::json!([8, 8, 0, 4]));
        assert!(zero.contains("positive"), "{zero}");
        let fingerprint = tenant_error(|t| t.config[BASIS_KEY]["fingerprint"] = Value::from("xyz"));
        assert!(fingerprint.contains("fingerprint") && fingerprint.contains("xyz"), "{fingerprint}");
        let not_object = tenant_error(|t| {
            t.config.insert(BASIS_KEY.into(), Value::from("basis/"));
        });
        assert!(not_object.contains("not an object"), "{not_object}");
    }

    #[test]
    fn a_tenant_with_a_bad_layout_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut tenant = sample_tenant();
        tenant.tensors.remove(&m_key("model.layers.0.mlp.up_proj"));
        assert!(tenant.write(dir.path()).is_err());
        assert!(!dir.path().join(TENSORS_FILE).exists());
    }

    #[test]
    fn version_2_is_read_and_3_is_not() {
        let dir = tempfile::tempdir().unwrap();
        sample_tenant().write(dir.path()).unwrap();
        let cfg = dir.path().join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg).unwrap().replace("\"format_version\": 2", "\"format_version\": 3");
        std::fs::write(&cfg, text).unwrap();
        let err = read_adapter_dir(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Format { .. }) && err.to_string().contains("format_version 3"), "{err}");
    }

    #[test]
    fn missing_directory_is_io_not_found() {
        let err = read_adapter_dir(Path::new("/nonexistent/adapter")).unwrap_err();
        match err {
            Error::Io { source, .. } => assert_eq!(source.kind(), std::io::ErrorKind::NotFound),
            other => panic!("{other}"),
        }
    }
}
