"""`evo2 infer`: generate, score, embed and variant effects on a trained StripedHyena 2 model.

Owns the infer config (config.py, no torch: `InferJob`, sections checkpoint, runtime, context, generate,
score, embed, variants), loading a model for inference, long records through the model (exact chunked
prefill or windows), sampling, and the output files. Public API (commands/infer.py is a thin layer over it):

Loading (evo2_cli.infer.loading; what a path means is model.checkpoint's `resolve_checkpoint`)
    load_inference_model(path, vortex_config=None, device='cpu', dtype='fp32', hcl_form=None,
                         clamp_poles=None) -> StripedHyena (eval, no grad) on the device and dtype
    prepare_for_inference(model, device, dtype)  a built model cast and placed as load_inference_model does
Inputs (evo2_cli.infer.sequences)
    encode_dna(text, where, policy='error'|'n') -> uint8 tokens, upper-cased
    read_sequences(fasta) -> Iterator[Sequence(id, tokens, description)]
Generation (evo2_cli.infer.generation, evo2_cli.infer.sampling)
    SamplingSettings(top_k, temperature, top_p) (config.py); sample(logits, settings, generators)
    generate(model, prompts, max_new_tokens, settings, num_samples, seed, batch_size, alphabet)
    generate_reference(...)         the same without the cache (full forward per token)
Long records, scoring, embedding, variants
    Context(mode='exact'|'windows', chunk, window, overlap, batch_tokens)               (config.py)
    per_token_pieces(model, records, readout, context, ...) -> Iterator[(record, rows)]: exact (chunked
                                    prefill) or windowed, in input order, in pieces (streamable)
    plan_windows(length, window, overlap); run_windows(model, arrays, forward, ...)   (windows.py)
    score_sequences(model, sequences, context, reverse_complement, ...) -> Iterator[Score]
    score_reference(model, tokens)  one forward over the whole record
    resolve_layer(model, name) -> Layer: our index names and the official engine's submodule names
    embed_sequences(model, sequences, layer, pooling, context) -> Embeddings; embedding_pieces(...)
    read_variants(path); load_reference(fasta, chroms); score_variants(model, variants, reference, ...)
    plan_variants(variants, reference, ...) then score_planned(model, variants, plans): checks before loading
Memory (evo2_cli.infer.memory)
    estimate_inference_memory(model, length, chunk, batch); check_inference_memory(estimate, device)
Outputs (evo2_cli.infer.outputs)
    write_table(path, rows, fmt), write_embeddings(...), embeddings_file(...) (streamed),
    atomic_text_output(path)
"""
