// llama-qualify: does this node's device compute what the build computed?
//
//   llama-qualify make OUT.gguf SEED    write the qualification model for SEED
//   llama-qualify record OUT.gguf OUT.json
//                                       try seeds until a model's greedy run on the CPU keeps every step's
//                                       top-1/top-2 logit gap wide and emits enough distinct tokens; write
//                                       that model and the token ids it produced (one JSON line)
//   llama-qualify run MODEL.gguf [--cpu]
//                                       the same greedy run on every device llama.cpp offers (or the CPU
//                                       alone); one JSON line: the ids, the smallest gap, the device used
//   llama-qualify --version
//
// The model is a llama with no tokenizer (token ids in, token ids out) and about 60 KB of f16 weights. Its
// output layer maps each token's embedding to the next token of a random cycle through the vocabulary; layer
// 0's feed-forward block is a lookup table that adds the embedding of another token (a random permutation),
// twice as strong, so the winning logit is that other token's successor, well clear of the rest, and only
// when the block is computed right; the remaining weights are small random ones that move every logit on
// their way. Greedy decoding of such a model gives the same ids on any correct backend (a GPU's rounding
// moves a logit by far less than the gap) and other ids where a matrix product, the norms, the activation
// or attention go wrong. Compiled by the image's toolchain stage, run by its runtime stage (Containerfile.j2).

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"
#include "llama.h"

enum {
    N_VOCAB = 64,
    N_EMBD = 32,
    N_HEAD = 4,
    N_LAYER = 2,
    N_FF = N_VOCAB,
    N_CTX = 64,
    N_PREDICT = 16,
    MIN_DISTINCT = 8,  // distinct ids among the N_PREDICT a recorded model must emit
    MAX_SEEDS = 200,
};
static const llama_token PROMPT[] = {3, 14, 15, 9, 26};
static const double MIN_GAP = 1.5;     // logits: a recorded model's smallest top-1/top-2 gap
static const double OUT_SCALE = 2.0;  // length of each output row: sets the logits' scale
static const double LAYER_STD = 0.12;  // spread of the other weights: they move logits, never past the gap
static const double SWAP_WEIGHT = 2.0;  // layer 0's lookup table outweighs the token's own embedding

// --- a small deterministic generator (splitmix64), normal deviates by Box-Muller ---
static uint64_t rng_state;

static uint64_t next_u64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double uniform(void) {  // in (0, 1)
    return ((double)(next_u64() >> 11) + 0.5) / 9007199254740992.0;
}

static double normal(void) {
    return sqrt(-2.0 * log(uniform())) * cos(6.283185307179586 * uniform());
}

static struct ggml_tensor * matrix(struct ggml_context * ctx, struct gguf_context * gguf, const char * name,
                                   int64_t cols, int64_t rows, const float * values, double std) {
    struct ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, cols, rows);
    ggml_fp16_t * data = t->data;
    for (int64_t i = 0; i < cols * rows; i++) {
        data[i] = ggml_fp32_to_fp16(values ? values[i] : (float)(normal() * std));
    }
    ggml_set_name(t, name);
    gguf_add_tensor(gguf, t);
    return t;
}

static void ones(struct ggml_context * ctx, struct gguf_context * gguf, const char * name, int64_t n) {
    struct ggml_tensor * t = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n);
    for (int64_t i = 0; i < n; i++) {
        ((float *)t->data)[i] = 1.0f;
    }
    ggml_set_name(t, name);
    gguf_add_tensor(gguf, t);
}

static void shuffle(int * p) {  // Fisher-Yates
    for (int i = 0; i < N_VOCAB; i++) {
        p[i] = i;
    }
    for (int i = N_VOCAB - 1; i > 0; i--) {
        int j = (int)(next_u64() % (uint64_t)(i + 1)), tmp = p[i];
        p[i] = p[j];
        p[j] = tmp;
    }
}

static int make_model(const char * out, uint64_t seed) {
    rng_state = seed * 0x2545F4914F6CDD1Dull + 1;
    struct ggml_init_params params = {64u << 20, NULL, false};
    struct ggml_context * ctx = ggml_init(params);
    struct gguf_context * gguf = gguf_init_empty();
    gguf_set_val_str(gguf, "general.architecture", "llama");
    gguf_set_val_str(gguf, "general.name", "builder-qualify");
    gguf_set_val_u32(gguf, "general.file_type", 1);  // mostly f16
    gguf_set_val_u32(gguf, "llama.context_length", N_CTX);
    gguf_set_val_u32(gguf, "llama.embedding_length", N_EMBD);
    gguf_set_val_u32(gguf, "llama.block_count", N_LAYER);
    gguf_set_val_u32(gguf, "llama.feed_forward_length", N_FF);
    gguf_set_val_u32(gguf, "llama.attention.head_count", N_HEAD);
    gguf_set_val_u32(gguf, "llama.attention.head_count_kv", N_HEAD);
    gguf_set_val_f32(gguf, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    gguf_set_val_u32(gguf, "llama.rope.dimension_count", N_EMBD / N_HEAD);
    gguf_set_val_u32(gguf, "llama.vocab_size", N_VOCAB);
    gguf_set_val_str(gguf, "tokenizer.ggml.model", "none");

    // Token embeddings: random directions. The output row of token next[t] is t's direction scaled to
    // OUT_SCALE: after the final norm, that logit is OUT_SCALE * sqrt(N_EMBD) when the residual stream holds
    // t's embedding alone, the others about OUT_SCALE each.
    static float embd[N_VOCAB * N_EMBD], output[N_VOCAB * N_EMBD];
    for (int i = 0; i < N_VOCAB * N_EMBD; i++) {
        embd[i] = (float)normal();
    }
    int order[N_VOCAB], swap[N_VOCAB];  // a random cycle through every token; a random permutation
    shuffle(order);
    shuffle(swap);
    for (int i = 0; i < N_VOCAB; i++) {
        int from = order[i], to = order[(i + 1) % N_VOCAB];
        double norm = 0;
        for (int k = 0; k < N_EMBD; k++) {
            norm += (double)embd[from * N_EMBD + k] * embd[from * N_EMBD + k];
        }
        for (int k = 0; k < N_EMBD; k++) {
            output[to * N_EMBD + k] = (float)(OUT_SCALE * embd[from * N_EMBD + k] / sqrt(norm));
        }
    }
    matrix(ctx, gguf, "token_embd.weight", N_EMBD, N_VOCAB, embd, 0);
    // Layer 0's feed-forward block is a lookup table: its gate and up rows are the tokens' directions, so
    // only the current token's unit fires (silu(a) * a with a = sqrt(N_EMBD)), and its down column adds
    // SWAP_WEIGHT times the embedding of swap[t] to the residual stream. The output layer then favours
    // next[swap[t]] over next[t]: without this block computed right, every id changes.
    static float keys[N_FF * N_EMBD], values[N_EMBD * N_FF];
    for (int k = 0; k < N_FF; k++) {
        double norm = 0;
        for (int i = 0; i < N_EMBD; i++) {
            norm += (double)embd[k * N_EMBD + i] * embd[k * N_EMBD + i];
        }
        for (int i = 0; i < N_EMBD; i++) {
            keys[k * N_EMBD + i] = (float)(embd[k * N_EMBD + i] / sqrt(norm));
            values[i * N_FF + k] = (float)(SWAP_WEIGHT * embd[swap[k] * N_EMBD + i] / N_EMBD);
        }
    }
    char name[64];
    for (int l = 0; l < N_LAYER; l++) {
        static const char * const square[] = {"attn_q", "attn_k", "attn_v", "attn_output"};
        snprintf(name, sizeof name, "blk.%d.attn_norm.weight", l);
        ones(ctx, gguf, name, N_EMBD);
        for (int m = 0; m < 4; m++) {
            snprintf(name, sizeof name, "blk.%d.%s.weight", l, square[m]);
            matrix(ctx, gguf, name, N_EMBD, N_EMBD, NULL, LAYER_STD);
        }
        snprintf(name, sizeof name, "blk.%d.ffn_norm.weight", l);
        ones(ctx, gguf, name, N_EMBD);
        snprintf(name, sizeof name, "blk.%d.ffn_gate.weight", l);
        matrix(ctx, gguf, name, N_EMBD, N_FF, l == 0 ? keys : NULL, LAYER_STD);
        snprintf(name, sizeof name, "blk.%d.ffn_up.weight", l);
        matrix(ctx, gguf, name, N_EMBD, N_FF, l == 0 ? keys : NULL, LAYER_STD);
        snprintf(name, sizeof name, "blk.%d.ffn_down.weight", l);
        matrix(ctx, gguf, name, N_FF, N_EMBD, l == 0 ? values : NULL, LAYER_STD);
    }
    ones(ctx, gguf, "output_norm.weight", N_EMBD);
    matrix(ctx, gguf, "output.weight", N_EMBD, N_VOCAB, output, 0);

    int ok = gguf_write_to_file(gguf, out, false);
    gguf_free(gguf);
    ggml_free(ctx);
    if (!ok) {
        fprintf(stderr, "llama-qualify: cannot write %s\n", out);
        return 1;
    }
    return 0;
}

// --- the greedy run ---
struct result {
    llama_token ids[N_PREDICT];
    double min_gap;
    int distinct;
    char device[64];  // the first device llama.cpp put the model on, "CPU" when none
    char error[256];
};

static int verbose;
static struct result * current;  // the run whose device the log names

static void on_log(enum ggml_log_level level, const char * text, void * data) {
    (void)data;
    struct result * r = current;
    const char * at = strstr(text, ": using device ");
    if (r && at && r->device[0] == '\0') {
        at += strlen(": using device ");
        size_t n = strcspn(at, " (");
        snprintf(r->device, sizeof r->device, "%.*s", (int)n, at);
    }
    if (verbose || level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static int greedy(const char * path, int cpu_only, struct result * r) {
    memset(r, 0, sizeof *r);
    current = r;
    struct llama_model_params mp = llama_model_default_params();
    ggml_backend_dev_t no_devices[] = {NULL};
    mp.n_gpu_layers = cpu_only ? 0 : 999;
    if (cpu_only) {
        mp.devices = no_devices;
    }
    struct llama_model * model = llama_model_load_from_file(path, mp);
    if (!model) {
        snprintf(r->error, sizeof r->error, "llama.cpp could not load %s", path);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = N_CTX;
    cp.n_batch = N_CTX;
    cp.n_ubatch = N_CTX;
    cp.n_seq_max = 1;
    cp.n_threads = cp.n_threads_batch = 2;
    cp.no_perf = true;
    cp.op_offload = !cpu_only;
    struct llama_context * lctx = llama_init_from_model(model, cp);
    if (!lctx) {
        snprintf(r->error, sizeof r->error, "llama.cpp could not make a context for %s", path);
        llama_model_free(model);
        return 1;
    }
    if (r->device[0] == '\0') {
        snprintf(r->device, sizeof r->device, "CPU");
    }
    llama_token prompt[sizeof PROMPT / sizeof PROMPT[0]];
    memcpy(prompt, PROMPT, sizeof prompt);
    struct llama_batch batch = llama_batch_get_one(prompt, (int32_t)(sizeof prompt / sizeof prompt[0]));
    int seen[N_VOCAB] = {0}, failed = 0;
    r->min_gap = INFINITY;
    for (int step = 0; step < N_PREDICT; step++) {
        if (llama_decode(lctx, batch) != 0) {
            snprintf(r->error, sizeof r->error, "llama_decode failed at step %d", step);
            failed = 1;
            break;
        }
        const float * logits = llama_get_logits_ith(lctx, -1);
        int best = 0;
        for (int i = 1; i < N_VOCAB; i++) {
            if (logits[i] > logits[best]) {
                best = i;
            }
        }
        double second = -INFINITY;
        for (int i = 0; i < N_VOCAB; i++) {
            if (i != best && logits[i] > second) {
                second = logits[i];
            }
        }
        if (!isfinite(logits[best]) || !isfinite(second)) {
            snprintf(r->error, sizeof r->error, "non-finite logits at step %d", step);
            failed = 1;
            break;
        }
        if (logits[best] - second < r->min_gap) {
            r->min_gap = logits[best] - second;
        }
        r->ids[step] = best;
        r->distinct += !seen[best];
        seen[best] = 1;
        batch = llama_batch_get_one(&r->ids[step], 1);
    }
    llama_free(lctx);
    llama_model_free(model);
    return failed;
}

static void print_ids(FILE * out, const llama_token * ids) {
    fputc('[', out);
    for (int i = 0; i < N_PREDICT; i++) {
        fprintf(out, "%s%d", i ? ", " : "", ids[i]);
    }
    fputc(']', out);
}

static void print_result(FILE * out, const struct result * r, long seed) {
    fputs("{", out);
    if (seed >= 0) {
        fprintf(out, "\"seed\": %ld, \"prompt\": [", seed);
        for (size_t i = 0; i < sizeof PROMPT / sizeof PROMPT[0]; i++) {
            fprintf(out, "%s%d", i ? ", " : "", PROMPT[i]);
        }
        fputs("], ", out);
    }
    fputs("\"ids\": ", out);
    print_ids(out, r->ids);
    fprintf(out, ", \"min_gap\": %.3f, \"distinct\": %d, \"device\": \"%s\"}\n", r->min_gap, r->distinct, r->device);
}

static int record(const char * model_path, const char * json_path) {
    for (long seed = 1; seed <= MAX_SEEDS; seed++) {
        struct result r;
        if (make_model(model_path, (uint64_t)seed) != 0) {
            return 1;
        }
        if (greedy(model_path, 1, &r) != 0) {
            fprintf(stderr, "llama-qualify: %s\n", r.error);
            return 1;
        }
        if (r.min_gap < MIN_GAP || r.distinct < MIN_DISTINCT) {
            continue;
        }
        FILE * out = fopen(json_path, "w");
        if (!out) {
            fprintf(stderr, "llama-qualify: cannot write %s\n", json_path);
            return 1;
        }
        print_result(out, &r, seed);
        print_result(stdout, &r, seed);
        return fclose(out) == 0 ? 0 : 1;
    }
    fprintf(stderr, "llama-qualify: no seed up to %d gives a gap >= %.1f and %d distinct ids\n", MAX_SEEDS, MIN_GAP,
            MIN_DISTINCT);
    return 1;
}

int main(int argc, char ** argv) {
    verbose = getenv("LLAMA_QUALIFY_VERBOSE") != NULL;
    const char * cmd = argc > 1 ? argv[1] : "";
    if (strcmp(cmd, "--version") == 0) {
        printf("llama-qualify: vocab %d, embd %d, layers %d, %d greedy steps\n", N_VOCAB, N_EMBD, N_LAYER, N_PREDICT);
        return 0;
    }
    if (strcmp(cmd, "make") == 0 && argc == 4) {
        char * end;
        unsigned long long seed = strtoull(argv[3], &end, 10);
        if (*end != '\0' || end == argv[3]) {
            fprintf(stderr, "llama-qualify: seed must be a number\n");
            return 2;
        }
        return make_model(argv[2], seed);
    }
    llama_log_set(on_log, NULL);  // before the backends load: their lines go where llama.cpp's go
    ggml_backend_load_all();
    llama_backend_init();
    if (strcmp(cmd, "record") == 0 && argc == 4) {
        return record(argv[2], argv[3]);
    }
    if (strcmp(cmd, "run") == 0 && (argc == 3 || (argc == 4 && strcmp(argv[3], "--cpu") == 0))) {
        struct result r;
        if (greedy(argv[2], argc == 4, &r) != 0) {
            fprintf(stderr, "llama-qualify: %s\n", r.error);
            return 1;
        }
        print_result(stdout, &r, -1);
        return 0;
    }
    fprintf(stderr, "usage: llama-qualify make OUT SEED | record OUT.gguf OUT.json | run MODEL [--cpu] | --version\n");
    return 2;
}
