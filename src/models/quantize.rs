//! Which of a loaded family's weights `--quantize` turns into int8 / int4 (the formats are
//! `crate::quant`'s): the Linear weights its decoder phases read, found from a plan of the model.

use std::collections::BTreeSet;

use super::Family;
use crate::error::{Error, Result};
use crate::generate::PlanShape;
use crate::graph::{Op, W};
use crate::quant::{QuantTensor, Quantize};
use crate::weights::Weight;

/// Quantizes, in the loaded family's weight table, the Linear weights of its decoder (see the
/// module comment for which). Returns how many weights were quantized.
pub fn quantize_family(family: &mut dyn Family, format: Quantize) -> Result<usize> {
    let targets = decoder_linear_weights(&*family)?;
    if targets.is_empty() {
        return Err(Error::Unsupported(format!(
            "--quantize {format}: this model's decoder has no Linear weight glimpse can quantize"
        )));
    }
    let table = std::sync::Arc::make_mut(&mut family.core_mut().weights);
    for w in &targets {
        let name = table.names[w.0].clone();
        let weight = &table.weights[w.0];
        if weight.quantized().is_some() {
            continue;
        }
        let q = QuantTensor::quantize(format, &name, &weight.shape, weight.as_slice())?;
        table.weights[w.0] = Weight::from_quantized(q);
    }
    Ok(targets.len())
}

/// The weights [`quantize_family`] quantizes, read off a plan of one image and a short prompt.
pub fn decoder_linear_weights(family: &dyn Family) -> Result<Vec<W>> {
    let text_rows = family.text_inputs(&["a"]).ok().flatten().map_or(0, |t| t.rows);
    let prompt_len = family.input_ids(&[0]).len().max(1);
    let shape = PlanShape { text_rows, ..PlanShape::new(1, prompt_len, 2) };
    let plan = family.plan_for(&shape)?;
    let logits = [plan.prefill.logits, plan.decode.logits];
    let mut linear = BTreeSet::new();
    let mut other = BTreeSet::new();
    let decoder = [&plan.prefill.phase, &plan.decode.phase];
    for phase in plan.encoders.iter().chain(decoder) {
        let in_decoder = decoder.iter().any(|p| std::ptr::eq(*p, phase));
        for op in &phase.ops {
            match *op {
                Op::Linear { weight, out, .. } if in_decoder && !logits.contains(&out) => {
                    linear.insert(weight.0);
                }
                Op::Linear { weight, bias, .. } => {
                    other.insert(weight.0);
                    other.extend(bias.map(|b| b.0));
                }
                _ => other.extend(op.weights().iter().map(|w| w.0)),
            }
            // A Linear's bias stays fp16 and is read as such.
            if let Op::Linear { bias: Some(b), .. } = *op {
                other.insert(b.0);
            }
        }
    }
    let weights = family.weights();
    Ok(linear.difference(&other).map(|&i| W(i)).filter(|&w| weights.get(w).shape.len() == 2).collect())
}
