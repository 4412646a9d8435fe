//! The one rule for generation settings from every source (the CLI's flags, Python's keyword
//! arguments, a chat checkpoint's generation_config.json): a value given replaces the default it
//! lands on, a value not given keeps it, as transformers' `generate(**kwargs)` overrides its
//! `GenerationConfig`. Validation happens once, on the result ([`GenerateOptions::validate`]).

use serde_json::Value;

use super::{EarlyStopping, GenerateOptions};
use crate::config::GenerationConfig;

/// Generation settings given by the caller; `None` keeps the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationOverrides {
    pub max_new_tokens: Option<usize>,
    pub max_length: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub no_repeat_ngram_size: Option<usize>,
    pub num_beams: Option<usize>,
    pub length_penalty: Option<f64>,
    pub early_stopping: Option<EarlyStopping>,
    pub num_return_sequences: Option<usize>,
    pub eos_token_ids: Option<Vec<u32>>,
    pub stop_strings: Option<Vec<String>>,
    pub seed: Option<u64>,
}

impl GenerationOverrides {
    /// The settings a checkpoint's generation_config.json gives (an `early_stopping` other than
    /// true, false or "never" is left out, as transformers ignores it).
    pub fn from_generation_config(g: &GenerationConfig) -> Self {
        Self {
            max_new_tokens: g.max_new_tokens,
            max_length: g.max_length,
            min_new_tokens: g.min_new_tokens,
            do_sample: g.do_sample,
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            min_p: g.min_p,
            repetition_penalty: g.repetition_penalty,
            no_repeat_ngram_size: g.no_repeat_ngram_size,
            num_beams: g.num_beams,
            length_penalty: g.length_penalty,
            early_stopping: match &g.early_stopping {
                Some(Value::Bool(true)) => Some(EarlyStopping::Done),
                Some(Value::Bool(false)) => Some(EarlyStopping::Heuristic),
                Some(Value::String(v)) if v == "never" => Some(EarlyStopping::Never),
                _ => None,
            },
            num_return_sequences: g.num_return_sequences,
            eos_token_ids: g.eos_token_id.as_ref().map(|e| e.to_vec()),
            stop_strings: g.stop_strings.as_ref().map(|s| s.to_vec()),
            seed: None,
        }
    }

    /// Writes every given value over `o`.
    pub fn apply(&self, o: &mut GenerateOptions) {
        fn set<T: Clone>(field: &mut T, given: &Option<T>) {
            if let Some(v) = given {
                *field = v.clone();
            }
        }
        fn set_optional<T: Clone>(field: &mut Option<T>, given: &Option<T>) {
            if given.is_some() {
                *field = given.clone();
            }
        }
        set_optional(&mut o.max_new_tokens, &self.max_new_tokens);
        set_optional(&mut o.max_length, &self.max_length);
        set(&mut o.min_new_tokens, &self.min_new_tokens);
        set(&mut o.do_sample, &self.do_sample);
        set(&mut o.temperature, &self.temperature);
        set(&mut o.top_k, &self.top_k);
        set(&mut o.top_p, &self.top_p);
        set_optional(&mut o.min_p, &self.min_p);
        set(&mut o.repetition_penalty, &self.repetition_penalty);
        set(&mut o.no_repeat_ngram_size, &self.no_repeat_ngram_size);
        set(&mut o.num_beams, &self.num_beams);
        set(&mut o.length_penalty, &self.length_penalty);
        set(&mut o.early_stopping, &self.early_stopping);
        set(&mut o.num_return_sequences, &self.num_return_sequences);
        set(&mut o.eos_token_ids, &self.eos_token_ids);
        set(&mut o.stop_strings, &self.stop_strings);
        set_optional(&mut o.seed, &self.seed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GenerationConfig, StopStringsField, TokenIds};

    fn defaults() -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: Some(7),
            min_p: Some(0.1),
            top_k: 50,
            seed: Some(3),
            eos_token_ids: vec![2],
            stop_strings: vec!["x".into()],
            ..GenerateOptions::default()
        }
    }

    #[test]
    fn unset_values_keep_the_defaults() {
        let mut o = defaults();
        GenerationOverrides::default().apply(&mut o);
        assert_eq!(o, defaults());
    }

    #[test]
    fn given_values_replace_the_defaults() {
        let mut o = defaults();
        let given = GenerationOverrides {
            max_new_tokens: Some(9),
            min_p: Some(0.2),
            top_k: Some(0),
            num_beams: Some(4),
            early_stopping: Some(EarlyStopping::Never),
            eos_token_ids: Some(vec![5, 6]),
            stop_strings: Some(vec![]),
            seed: Some(11),
            ..GenerationOverrides::default()
        };
        given.apply(&mut o);
        let want = GenerateOptions {
            max_new_tokens: Some(9),
            min_p: Some(0.2),
            top_k: 0,
            num_beams: 4,
            early_stopping: EarlyStopping::Never,
            eos_token_ids: vec![5, 6],
            stop_strings: vec![],
            seed: Some(11),
            ..defaults()
        };
        assert_eq!(o, want);
    }

    #[test]
    fn generation_config_fields_map_one_to_one() {
        let g = GenerationConfig {
            max_length: Some(30),
            eos_token_id: Some(TokenIds::Many(vec![2, 7])),
            do_sample: Some(true),
            temperature: Some(0.5),
            early_stopping: Some(Value::Bool(true)),
            stop_strings: Some(StopStringsField::One("END".into())),
            ..GenerationConfig::default()
        };
        let over = GenerationOverrides::from_generation_config(&g);
        assert_eq!(over.max_length, Some(30));
        assert_eq!(over.eos_token_ids, Some(vec![2, 7]));
        assert_eq!((over.do_sample, over.temperature), (Some(true), Some(0.5)));
        assert_eq!(over.early_stopping, Some(EarlyStopping::Done));
        assert_eq!(over.stop_strings, Some(vec!["END".to_string()]));
        // Unset fields stay unset; a value transformers ignores is ignored.
        assert_eq!((over.max_new_tokens, over.num_beams, over.seed), (None, None, None));
        let odd =
            GenerationConfig { early_stopping: Some(Value::String("sometimes".into())), ..GenerationConfig::default() };
        assert_eq!(GenerationOverrides::from_generation_config(&odd).early_stopping, None);
    }
}
