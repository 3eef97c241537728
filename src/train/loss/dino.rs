//! DINO's self-distillation loss with centring. Caron, Touvron, Misra, Jégou, Mairal,
//! Bojanowski, Joulin, "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.
//!
//! The teacher (an EMA of the student) sees the global crops, the student all crops. Each
//! teacher output `t` `[B, K]` is centred and sharpened into a target distribution, which the
//! student's output `s` of every *other* crop predicts:
//!
//! ```text
//! P_t = softmax((t − c)/τ_t),  no gradient          (τ_t 0.04: sharpening)
//! L   = (1/#pairs) Σ_{t, s: different crops} mean_b[ −Σ_k P_t log softmax(s/τ_s) ]   (τ_s 0.1)
//! c  ← m c + (1 − m) mean over the batch and the teacher crops of t                 (m 0.9)
//! ```
//!
//! Centring keeps one dimension from dominating, sharpening keeps the distribution from going
//! uniform: the two together prevent collapse.

use candle_core::{bail, DType, Device, Result, Tensor, D};

use super::common::{expect_float_matrix, expect_positive, log_sum_exp_rows};

/// DINO's cross-entropy between teacher and student crops. `student` holds the student's outputs
/// for all crops, `teacher` the teacher's outputs for the global crops; both `[B, K]` per crop, and
/// `student[i]` is the same crop as `teacher[i]` for the global crops (those pairs are skipped).
/// `center` is `[K]` or `[1, K]`. Teacher outputs are detached here.
pub fn dino(
    student: &[Tensor],
    teacher: &[Tensor],
    center: &Tensor,
    student_temperature: f64,
    teacher_temperature: f64,
) -> Result<Tensor> {
    expect_positive("student_temperature", student_temperature)?;
    expect_positive("teacher_temperature", teacher_temperature)?;
    if teacher.is_empty() || student.len() < 2 || teacher.len() > student.len() {
        bail!(
            "DINO needs at least one teacher crop and two student crops, the global ones first; got {} teacher and {} student crops",
            teacher.len(),
            student.len()
        )
    }
    let shape = expect_float_matrix("teacher[0]", &teacher[0])?;
    for (i, crop) in teacher.iter().chain(student).enumerate() {
        if expect_float_matrix("crop output", crop)? != shape {
            bail!("every crop output must have shape {shape:?} like teacher[0]; crop {i} has {:?}", crop.dims())
        }
    }
    let center = center.reshape((1, shape.1))?.detach().to_dtype(teacher[0].dtype())?;
    let student_log_probabilities = student
        .iter()
        .map(|s| {
            let logits = (s / student_temperature)?;
            logits.broadcast_sub(&log_sum_exp_rows(&logits)?.unsqueeze(1)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut total: Option<Tensor> = None;
    let mut pairs = 0;
    for (teacher_crop, t) in teacher.iter().enumerate() {
        let targets = candle_nn::ops::softmax(&(t.detach().broadcast_sub(&center)? / teacher_temperature)?, D::Minus1)?;
        for (student_crop, log_probabilities) in student_log_probabilities.iter().enumerate() {
            if student_crop == teacher_crop {
                continue;
            }
            let cross_entropy = (&targets * log_probabilities)?.sum(D::Minus1)?.neg()?.mean_all()?;
            total = Some(match total {
                None => cross_entropy,
                Some(sum) => (sum + cross_entropy)?,
            });
            pairs += 1;
        }
    }
    let total = total.expect("at least one teacher-student pair, checked above");
    total / pairs as f64
}

/// DINO's running centre of the teacher outputs, `c ← m c + (1 − m) mean(t)`, kept in F32.
pub struct DinoCenter {
    center: Tensor,
    momentum: f64,
}

impl DinoCenter {
    /// A zero centre of dimension `dim` with update momentum `momentum` (0.9 in DINO).
    pub fn new(dim: usize, momentum: f64, device: &Device) -> Result<Self> {
        Self::from_tensor(&Tensor::zeros(dim, DType::F32, device)?, momentum)
    }

    /// Restores a centre saved from [`tensor`](Self::tensor) (`[K]`).
    pub fn from_tensor(center: &Tensor, momentum: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&momentum) {
            bail!("the centre momentum must lie in [0, 1], got {momentum}")
        }
        let center = center.detach().to_dtype(DType::F32)?.flatten_all()?;
        Ok(Self { center, momentum })
    }

    /// The centre `[K]`.
    pub fn tensor(&self) -> &Tensor {
        &self.center
    }

    /// Moves the centre towards the mean of the teacher outputs (`[B, K]` per global crop).
    pub fn update(&mut self, teacher: &[Tensor]) -> Result<()> {
        if teacher.is_empty() {
            bail!("DinoCenter::update needs at least one teacher output")
        }
        let outputs = Tensor::cat(teacher, 0)?.detach().to_dtype(DType::F32)?;
        if outputs.dims().len() != 2 || outputs.dims()[1] != self.center.dims()[0] {
            bail!("teacher outputs must be [B, {}], got {:?}", self.center.dims()[0], teacher[0].dims())
        }
        let batch_mean = outputs.mean(0)?;
        self.center = ((&self.center * self.momentum)? + (batch_mean * (1.0 - self.momentum))?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::testing::*;
    use candle_core::Var;

    fn softmax(row: &[f64]) -> Vec<f64> {
        let lse = log_sum_exp(row);
        row.iter().map(|x| (x - lse).exp()).collect()
    }

    fn reference(student: &[Vec<Vec<f64>>], teacher: &[Vec<Vec<f64>>], center: &[f64], ts: f64, tt: f64) -> f64 {
        let (mut total, mut pairs) = (0.0, 0);
        for (it, t) in teacher.iter().enumerate() {
            for (is, s) in student.iter().enumerate() {
                if is == it {
                    continue;
                }
                let mut sum = 0.0;
                for (t_row, s_row) in t.iter().zip(s) {
                    let centred: Vec<f64> = t_row.iter().zip(center).map(|(x, c)| (x - c) / tt).collect();
                    let target = softmax(&centred);
                    let scaled: Vec<f64> = s_row.iter().map(|x| x / ts).collect();
                    let lse = log_sum_exp(&scaled);
                    sum += -target.iter().zip(&scaled).map(|(p, x)| p * (x - lse)).sum::<f64>();
                }
                total += sum / t.len() as f64;
                pairs += 1;
            }
        }
        total / pairs as f64
    }

    /// Two global crops and one local crop, batch 2, K = 3.
    fn crops() -> (Vec<Rows>, Vec<Rows>) {
        let student = vec![
            vec![vec![0.5, -0.2, 0.1], vec![0.3, 0.8, -0.4]],
            vec![vec![0.2, 0.1, 0.0], vec![-0.6, 0.4, 0.9]],
            vec![vec![1.0, -1.0, 0.3], vec![0.0, 0.2, -0.2]],
        ];
        let teacher =
            vec![vec![vec![0.4, -0.1, 0.2], vec![0.1, 0.7, -0.3]], vec![vec![0.3, 0.0, 0.1], vec![-0.5, 0.3, 0.8]]];
        (student, teacher)
    }

    const CENTER: [f64; 3] = [0.1, -0.05, 0.2];

    #[test]
    fn matches_the_definition() -> Result<()> {
        let (student, teacher) = crops();
        let s: Vec<Tensor> = student.iter().map(|m| matrix(m)).collect();
        let t: Vec<Tensor> = teacher.iter().map(|m| matrix(m)).collect();
        let center = Tensor::new(&CENTER, &Device::Cpu)?;
        let value = dino(&s, &t, &center, 0.1, 0.04)?.to_scalar::<f64>()?;
        let expected = reference(&student, &teacher, &CENTER, 0.1, 0.04);
        assert!((value - expected).abs() < 1e-10, "{value} vs {expected}");
        let s32: Vec<Tensor> = s.iter().map(|x| x.to_dtype(DType::F32).unwrap()).collect();
        let t32: Vec<Tensor> = t.iter().map(|x| x.to_dtype(DType::F32).unwrap()).collect();
        let value32 = dino(&s32, &t32, &center.to_dtype(DType::F32)?, 0.1, 0.04)?.to_scalar::<f32>()?;
        assert!((value32 as f64 - expected).abs() < 1e-4);
        Ok(())
    }

    #[test]
    fn student_gradients_match_and_the_teacher_gets_none() -> Result<()> {
        let (student, teacher) = crops();
        let mut inputs: Vec<Tensor> = student.iter().map(|m| matrix(m)).collect();
        inputs.extend(teacher.iter().map(|m| matrix(m)));
        let center = Tensor::new(&CENTER, &Device::Cpu)?;
        assert_gradients_match_finite_differences(&inputs, &[0, 1, 2], |x| dino(&x[..3], &x[3..], &center, 0.1, 0.04));
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = dino(&tensors[..3], &tensors[3..], &center, 0.1, 0.04)?.backward()?;
        assert!(tensors[3..].iter().all(|t| grads.get(t).is_none()));
        Ok(())
    }

    #[test]
    fn center_moves_by_an_exponential_moving_average() -> Result<()> {
        let (_, teacher) = crops();
        let t: Vec<Tensor> = teacher.iter().map(|m| matrix(m)).collect();
        let mut center = DinoCenter::from_tensor(&Tensor::new(&CENTER, &Device::Cpu)?, 0.9)?;
        center.update(&t)?;
        let rows: Vec<&Vec<f64>> = teacher.iter().flatten().collect();
        let updated = center.tensor().to_vec1::<f32>()?;
        for k in 0..3 {
            let mean = rows.iter().map(|r| r[k]).sum::<f64>() / rows.len() as f64;
            let expected = 0.9 * CENTER[k] + 0.1 * mean;
            assert!((updated[k] as f64 - expected).abs() < 1e-6, "{} vs {expected}", updated[k]);
        }
        Ok(())
    }

    #[test]
    fn rejects_a_single_crop() {
        let x = matrix(&[vec![1.0, 0.0]]);
        let center = Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap();
        let err = dino(std::slice::from_ref(&x), std::slice::from_ref(&x), &center, 0.1, 0.04).unwrap_err().to_string();
        assert!(err.contains("two student crops"), "{err}");
    }
}
