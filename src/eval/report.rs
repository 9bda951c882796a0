//! The evaluation's records and reports: per-image metrics (one JSONL line per face), their
//! aggregation per method, and the Markdown table (shaped like the paper's Table I), JSON and CSV.
//!
//! Aggregation: a method's value is the mean over every (face, sample). With K > 1 samples per
//! face the spread shown is the mean over faces of the standard deviation over that face's K
//! samples (how much the sampler's randomness moves one face's score); the JSON also has the
//! standard deviation over faces of the per-face means. A mean over values that include an
//! infinite PSNR (identical images) is reported as `inf`.
use serde::{Deserialize, Serialize};

/// The metrics of one SR image against its ground truth.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// dB, peak 255; `inf` for identical images.
    #[serde(with = "nonfinite")]
    pub psnr: f64,
    pub ssim: f64,
    /// MSE (0–255 scale) between the SR shrunk to the LR size and the LR input.
    pub consistency: f64,
    /// Cosine of the face descriptors.
    pub cs: f64,
    /// Euclidean distance of the face descriptors.
    pub l2: f64,
}

impl Metrics {
    /// The metrics as (column name, value) pairs, in the table's order.
    pub fn fields(&self) -> [(&'static str, f64); 5] {
        [
            ("psnr", self.psnr),
            ("ssim", self.ssim),
            ("consistency", self.consistency),
            ("cs", self.cs),
            ("l2", self.l2),
        ]
    }
}

/// One method's results on one face: a metrics set per sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MethodRecord {
    pub method: String,
    /// The Langevin snr of a sweep point.
    pub snr: Option<f64>,
    pub samples: Vec<Metrics>,
    /// With K > 1 samples: how much they differ, and how good their mean is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<SpreadRecord>,
}

/// The spread of one face's K samples (see [`crate::uncertainty`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpreadRecord {
    /// Mean over the picture of the per-pixel std over the samples (intensity levels, 0–255).
    pub pixel_std: f64,
    /// PSNR of the per-pixel mean of the samples (8-bit) against the HR.
    #[serde(with = "nonfinite")]
    pub psnr_mean: f64,
}

/// Everything measured on one face: one JSONL line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Position in the evaluated list (part of the noise seed).
    pub index: usize,
    /// The HR file, as found in the --hr folder.
    pub file: String,
    pub methods: Vec<MethodRecord>,
}

/// Mean and spreads of one metric of one method.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Stat {
    #[serde(with = "nonfinite")]
    pub mean: f64,
    /// Mean over faces of the std over a face's samples; absent with one sample.
    #[serde(with = "nonfinite_opt")]
    pub sample_std: Option<f64>,
    /// Std over faces of the per-face means (population).
    #[serde(with = "nonfinite")]
    pub face_std: f64,
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MethodSummary {
    pub method: String,
    pub snr: Option<f64>,
    pub faces: usize,
    pub samples: usize,
    pub psnr: Stat,
    pub ssim: Stat,
    pub consistency: Stat,
    pub cs: Stat,
    pub l2: Stat,
    /// With K > 1 samples per face: their spread and the error of their mean.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spread: Option<SpreadSummary>,
}

/// A method's [`SpreadRecord`]s over the faces that have one.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SpreadSummary {
    pub faces: usize,
    /// Mean over faces of the mean per-pixel std (levels, 0–255).
    pub pixel_std: f64,
    /// Mean over faces of the PSNR of the mean of the samples.
    #[serde(with = "nonfinite")]
    pub psnr_mean: f64,
    /// Mean over the same faces of the PSNR of sample 1 alone (the first), for comparison.
    #[serde(with = "nonfinite")]
    pub psnr_first: f64,
}

/// Rows in the order the methods first appear in the records.
pub fn summarize(records: &[ImageRecord]) -> Vec<MethodSummary> {
    let mut keys: Vec<(String, Option<f64>)> = Vec::new();
    for r in records {
        for m in &r.methods {
            let key = (m.method.clone(), m.snr);
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    keys.into_iter()
        .map(|(method, snr)| {
            let records_of: Vec<&MethodRecord> = records
                .iter()
                .flat_map(|r| &r.methods)
                .filter(|m| m.method == method && m.snr == snr)
                .collect();
            let per_face: Vec<&[Metrics]> = records_of.iter().map(|m| m.samples.as_slice()).collect();
            let spreads: Vec<(&SpreadRecord, f64)> = records_of
                .iter()
                .filter_map(|m| Some((m.spread.as_ref()?, m.samples.first()?.psnr)))
                .collect();
            let spread = (!spreads.is_empty()).then(|| SpreadSummary {
                faces: spreads.len(),
                pixel_std: mean(&spreads.iter().map(|s| s.0.pixel_std).collect::<Vec<_>>()),
                psnr_mean: mean(&spreads.iter().map(|s| s.0.psnr_mean).collect::<Vec<_>>()),
                psnr_first: mean(&spreads.iter().map(|s| s.1).collect::<Vec<_>>()),
            });
            let stat = |k: usize| {
                let values: Vec<Vec<f64>> = per_face
                    .iter()
                    .map(|s| s.iter().map(|m| m.fields()[k].1).collect())
                    .collect();
                stat(&values)
            };
            MethodSummary {
                faces: per_face.len(),
                samples: per_face.iter().map(|s| s.len()).max().unwrap_or(0),
                psnr: stat(0),
                ssim: stat(1),
                consistency: stat(2),
                cs: stat(3),
                l2: stat(4),
                spread,
                method,
                snr,
            }
        })
        .collect()
}

/// Statistics of `values[face][sample]`.
fn stat(values: &[Vec<f64>]) -> Stat {
    let all: Vec<f64> = values.iter().flatten().copied().collect();
    let face_means: Vec<f64> = values.iter().map(|v| mean(v)).collect();
    let sample_std = values
        .iter()
        .any(|v| v.len() > 1)
        .then(|| mean(&values.iter().map(|v| std(v)).collect::<Vec<_>>()));
    Stat {
        mean: mean(&all),
        sample_std,
        face_std: std(&face_means),
    }
}

/// Arithmetic mean (NaN for no values; `inf` if any value is).
pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Population standard deviation (0 for one value, NaN if any value is not finite).
pub fn std(v: &[f64]) -> f64 {
    if v.iter().any(|x| !x.is_finite()) {
        return f64::NAN;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64).sqrt()
}

/// Pearson's correlation coefficient of paired values; `None` with fewer than two pairs or when
/// either variable is constant or not finite.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() != y.len() || x.len() < 2 || x.iter().chain(y).any(|v| !v.is_finite()) {
        return None;
    }
    let (mx, my) = (mean(x), mean(y));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| (sxy / (sxx * syy).sqrt()).clamp(-1.0, 1.0))
}

/// The row label of a method.
pub fn label(method: &str, snr: Option<f64>) -> String {
    match snr {
        Some(s) => format!("{method} (snr {s})"),
        None => method.to_string(),
    }
}

/// A number for the table: fixed decimals, `inf` / `n/a` for the non-finite.
fn num(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{v:.decimals$}")
    }
}

fn cell(s: &Stat, decimals: usize) -> String {
    match s.sample_std {
        Some(sd) if s.mean.is_finite() => format!("{} ± {}", num(s.mean, decimals), num(sd, decimals)),
        _ => num(s.mean, decimals),
    }
}

/// The Markdown table: rows = methods; PSNR ↑, SSIM ↑, consistency ↓, CS ↑, descriptor L2 ↓.
pub fn markdown_table(rows: &[MethodSummary]) -> String {
    let mut s = String::from(
        "| Method | PSNR ↑ | SSIM ↑ | Consistency ↓ | CS ↑ | Descriptor L2 ↓ |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            label(&r.method, r.snr),
            cell(&r.psnr, 2),
            cell(&r.ssim, 4),
            cell(&r.consistency, 3),
            cell(&r.cs, 4),
            cell(&r.l2, 4),
        );
    }
    let spread: Vec<(&MethodSummary, &SpreadSummary)> = rows
        .iter()
        .filter_map(|r| Some((r, r.spread.as_ref()?)))
        .collect();
    if !spread.is_empty() {
        s += "\nThe spread of the K samples of a face (mean over the picture of the per-pixel std, \
              0–255 levels; the features the LR input pins down vary little) and the error of their \
              per-pixel mean against one sample:\n\n\
              | Method | Pixel std | PSNR of the mean ↑ | PSNR of sample 1 ↑ | Mean − sample 1 (dB) |\n\
              |---|---:|---:|---:|---:|\n";
        for (r, sp) in spread {
            s += &format!(
                "| {} | {} | {} | {} | {} |\n",
                label(&r.method, r.snr),
                num(sp.pixel_std, 2),
                num(sp.psnr_mean, 2),
                num(sp.psnr_first, 2),
                num(sp.psnr_mean - sp.psnr_first, 2),
            );
        }
    }
    s
}

/// One CSV row per (face, method, sample).
pub fn csv(records: &[ImageRecord]) -> String {
    let mut s = String::from("index,file,method,snr,sample,psnr,ssim,consistency,cs,l2\n");
    for r in records {
        for m in &r.methods {
            for (k, x) in m.samples.iter().enumerate() {
                let snr = m.snr.map(|v| v.to_string()).unwrap_or_default();
                let vals: Vec<String> = x.fields().iter().map(|(_, v)| csv_num(*v)).collect();
                s += &format!(
                    "{},{},{},{snr},{k},{}\n",
                    r.index,
                    csv_field(&r.file),
                    csv_field(&m.method),
                    vals.join(",")
                );
            }
        }
    }
    s
}

fn csv_num(v: f64) -> String {
    if v.is_finite() {
        v.to_string()
    } else {
        num(v, 0)
    }
}

/// Quotes a field holding a comma, quote or line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// JSON numbers cannot be infinite or NaN: such values are written as the strings "inf", "-inf"
/// and "nan" and read back.
mod nonfinite {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("nan")
        } else if *v > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        F(f64),
        S(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Num::deserialize(d)? {
            Num::F(v) => Ok(v),
            Num::S(s) => match s.as_str() {
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                "nan" => Ok(f64::NAN),
                _ => Err(serde::de::Error::custom(format!("not a number: {s:?}"))),
            },
        }
    }
}

mod nonfinite_opt {
    use serde::Serializer;

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::nonfinite::serialize(v, s),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(psnr: f64, cs: f64) -> Metrics {
        Metrics {
            psnr,
            ssim: 0.5,
            consistency: 1.0,
            cs,
            l2: 0.1,
        }
    }

    #[test]
    fn records_round_trip_through_json_with_inf() {
        let r = ImageRecord {
            index: 3,
            file: "a.png".into(),
            methods: vec![MethodRecord {
                method: "HR vs HR".into(),
                snr: None,
                samples: vec![m(f64::INFINITY, 1.0), m(21.123456789012345, 0.25)],
                spread: Some(SpreadRecord {
                    pixel_std: 3.5,
                    psnr_mean: 22.0,
                }),
            }],
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains("\"inf\""));
        let back: ImageRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn summary_means_and_spreads() {
        let rec = |i, s: Vec<Metrics>| ImageRecord {
            index: i,
            file: format!("{i}.png"),
            methods: vec![MethodRecord {
                method: "x".into(),
                snr: Some(0.1),
                samples: s,
                spread: None,
            }],
        };
        let rows = summarize(&[
            rec(0, vec![m(20.0, 0.2), m(22.0, 0.4)]),
            rec(1, vec![m(30.0, 0.6), m(30.0, 0.6)]),
        ]);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.faces, r.samples), (2, 2));
        assert!((r.psnr.mean - 25.5).abs() < 1e-12);
        assert!((r.psnr.sample_std.unwrap() - 0.5).abs() < 1e-12); // (1 + 0) / 2
        assert!((r.psnr.face_std - 4.5).abs() < 1e-12); // means 21 and 30
        let table = markdown_table(&rows);
        assert!(table.contains("| x (snr 0.1) | 25.50 ± 0.50 |"), "{table}");
        let inf = summarize(&[rec(0, vec![m(f64::INFINITY, 1.0)])]);
        assert!(markdown_table(&inf).contains("| inf |"));
    }

    #[test]
    fn spread_summary_compares_the_mean_with_sample_1() {
        let rec = |i, first: f64, pixel_std: f64, psnr_mean: f64| ImageRecord {
            index: i,
            file: format!("{i}.png"),
            methods: vec![MethodRecord {
                method: "dpm2".into(),
                snr: None,
                samples: vec![m(first, 0.5), m(first - 1.0, 0.5)],
                spread: Some(SpreadRecord { pixel_std, psnr_mean }),
            }],
        };
        let rows = summarize(&[rec(0, 20.0, 4.0, 21.0), rec(1, 22.0, 6.0, 24.0)]);
        let sp = rows[0].spread.unwrap();
        assert_eq!(
            (sp.faces, sp.pixel_std, sp.psnr_mean, sp.psnr_first),
            (2, 5.0, 22.5, 21.0)
        );
        let table = markdown_table(&rows);
        assert!(
            table.contains("| dpm2 | 5.00 | 22.50 | 21.00 | 1.50 |"),
            "{table}"
        );
        // Without spreads (K = 1) the second table is absent.
        let mut plain = rec(0, 20.0, 0.0, 0.0);
        plain.methods[0].spread = None;
        let rows = summarize(&[plain]);
        assert!(rows[0].spread.is_none() && !markdown_table(&rows).contains("Pixel std"));
    }

    #[test]
    fn pearson_known_values() {
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.5]).unwrap() - 0.997949).abs() < 1e-5);
        assert_eq!(pearson(&[1.0, 2.0], &[-1.0, -3.0]), Some(-1.0));
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(pearson(&[1.0], &[1.0]), None);
    }

    #[test]
    fn csv_quotes_and_inf() {
        let r = ImageRecord {
            index: 0,
            file: "a,b.png".into(),
            methods: vec![MethodRecord {
                method: "bicubic".into(),
                snr: None,
                samples: vec![m(f64::INFINITY, 1.0)],
                spread: None,
            }],
        };
        let c = csv(&[r]);
        assert_eq!(
            c.lines().nth(1).unwrap(),
            "0,\"a,b.png\",bicubic,,0,inf,0.5,1,1,0.1"
        );
    }
}
