//! The generation flags of `caption` and `ask`: each overrides the checkpoint's default
//! (`Model::default_options`, resolved as transformers resolves its GenerationConfig).

use clap::Args;
use glimpse::generate::{EarlyStopping, GenerationOverrides};
use glimpse::GenerateOptions;

#[derive(Args, Debug, Default)]
pub struct GenArgs {
    /// Beam search with this many beams (1: greedy decoding).
    #[arg(long)]
    pub num_beams: Option<usize>,
    /// Sample the next token instead of taking the most likely one.
    #[arg(long)]
    pub do_sample: bool,
    /// Sampling temperature (with --do-sample).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Keep the k most likely tokens when sampling (0: all; transformers' default 50).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches p.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Drop tokens less likely than min_p times the most likely one (with --do-sample).
    #[arg(long)]
    pub min_p: Option<f64>,
    /// Penalize tokens already in the sequence (1.0: off).
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Never repeat an n-gram of this size (0: off).
    #[arg(long)]
    pub no_repeat_ngram_size: Option<usize>,
    /// Beam scores are sum(logprobs) / length^length_penalty (default 1.0; >0 favours longer).
    #[arg(long, allow_hyphen_values = true)]
    pub length_penalty: Option<f64>,
    /// Beam search stopping: true, false (default) or never, as transformers.
    #[arg(long)]
    pub early_stopping: Option<String>,
    /// Sequences returned per image: beam search's best hypotheses (at most --num-beams), or
    /// with --do-sample that many independent samples.
    #[arg(long)]
    pub num_return_sequences: Option<usize>,
    /// Seed of the sampling random generator.
    #[arg(long)]
    pub seed: Option<u64>,
    /// No EOS before this many new tokens.
    #[arg(long)]
    pub min_new_tokens: Option<usize>,
    /// Stop a sequence once its tokens complete this string (repeatable; transformers'
    /// stop_strings: matched on the tokenizer's token strings, the string stays in the output).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Print the text as it is generated (plain output, one beam).
    #[arg(long)]
    pub stream: bool,
}

impl GenArgs {
    /// The flags given, as overrides of the checkpoint's defaults.
    pub fn overrides(&self) -> glimpse::Result<GenerationOverrides> {
        Ok(GenerationOverrides {
            num_beams: self.num_beams,
            do_sample: self.do_sample.then_some(true),
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            length_penalty: self.length_penalty,
            early_stopping: self.early_stopping.as_deref().map(str::parse::<EarlyStopping>).transpose()?,
            num_return_sequences: self.num_return_sequences,
            seed: self.seed,
            min_new_tokens: self.min_new_tokens,
            // Given stop strings replace the checkpoint's (a call kwarg overrides generation_config).
            stop_strings: (!self.stop.is_empty()).then(|| self.stop.clone()),
            ..GenerationOverrides::default()
        })
    }

    /// --stream prints one sequence as it grows: plain output of greedy decoding or sampling.
    pub fn check_stream(&self, opts: &GenerateOptions, json: bool) -> glimpse::Result<()> {
        if !self.stream {
            return Ok(());
        }
        if json {
            return Err(glimpse::Error::InvalidInput(
                "--stream prints plain text as it is generated and cannot be combined with --json: drop one of them"
                    .into(),
            ));
        }
        if opts.num_beams > 1 {
            return Err(glimpse::Error::InvalidInput(format!(
                "--stream with --num-beams {}: beam search only knows its best hypothesis at the end; drop --stream or use one beam",
                opts.num_beams
            )));
        }
        if opts.num_return_sequences > 1 {
            return Err(glimpse::Error::InvalidInput(format!(
                "--stream with --num-return-sequences {}: the stream prints one sequence; drop --stream to get all of them",
                opts.num_return_sequences
            )));
        }
        Ok(())
    }
}
