// llama-rpc-seed: fill ggml-rpc-server's tensor cache (-c) from a GGUF on the worker's own disk.
//
//   llama-rpc-seed [--tensors FILE] [--threads N] [--verify] [--dry-run] [--list] [--] MODEL.gguf CACHE_DIR
//   llama-rpc-seed --format      the cache format this build writes, one JSON line
//   llama-rpc-seed --version
//
// When a head loads a model onto an RPC worker, every weight tensor larger than HASH_THRESHOLD is first
// offered by hash (RPC_CMD_SET_TENSOR_HASH): the FNV-1a 64 of the tensor's bytes. A worker started with -c
// looks for the file CACHE_DIR/<hash as 16 lowercase hex digits>; when it is there, the worker copies it
// into the tensor and the head sends nothing more for it. Otherwise the head sends the bytes and the worker
// saves them under that name. This program writes the same files from the GGUF the head will load, so the
// first load sends hashes instead of weights. The constants below are those of the pinned llama.cpp
// (ggml/src/ggml-rpc/ggml-rpc.cpp); the image build checks the source still says so, and builder's tests
// check the real ggml-rpc-server reads and writes exactly these files.
//
// Each file is written under a temporary name in CACHE_DIR (a dot name, never 16 hex digits), flushed to
// disk, and renamed into place: ggml-rpc-server never sees half a file. A file already there with the right
// size is kept (--verify hashes it again and replaces it if its bytes differ). --tensors FILE limits the
// seed to the tensors placed on this worker (names one per line, # comments); without it, every large
// tensor of the GGUF. One JSON line on stdout sums it up; --list adds one line per large tensor before it.
// Exit 0 done, 1 an I/O error (nothing half-written stays under a cache name), 2 bad arguments or input.
// Compiled by the image's toolchain stage against ggml-base (the gguf reader), installed next to
// ggml-rpc-server (Containerfile.j2).

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gguf.h"

// ggml-rpc.cpp: `const size_t HASH_THRESHOLD = 10 * 1024 * 1024;`, used as `size > HASH_THRESHOLD`
#define RPC_HASH_THRESHOLD ((uint64_t)10 * 1024 * 1024)
// ggml-rpc.cpp: fnv_hash(), FNV-1a 64 with its standard offset basis and prime
#define FNV_OFFSET_BASIS 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL
#define CHUNK ((size_t)8 << 20)
#define MAX_THREADS 64

enum state { STATE_PRESENT, STATE_WRITTEN, STATE_WOULD_WRITE, STATE_REPLACED, STATE_FAILED };
static const char * STATE_NAMES[] = {"present", "written", "would-write", "replaced", "failed"};

struct job {
    const char * name;
    uint64_t offset;  // in the GGUF file
    uint64_t size;
    uint64_t hash;
    enum state state;
    char error[256];
};

static struct {
    int model_fd;
    int cache_fd;
    const char * cache_dir;
    bool verify, dry_run;
    struct job * jobs;
    size_t n_jobs, next;
    pthread_mutex_t lock;
} g = {.lock = PTHREAD_MUTEX_INITIALIZER};

static uint64_t fnv_update(uint64_t hash, const uint8_t * data, size_t len) {
    for (size_t i = 0; i < len; i++) {
        hash ^= data[i];
        hash *= FNV_PRIME;
    }
    return hash;
}

// Read [offset, offset + size) of fd, hashing it; with out >= 0 also write it there. 0 or an errno.
static int stream(int fd, uint64_t offset, uint64_t size, int out, uint8_t * buf, uint64_t * hash) {
    uint64_t h = FNV_OFFSET_BASIS, done = 0;
    while (done < size) {
        size_t want = size - done < CHUNK ? (size_t)(size - done) : CHUNK;
        ssize_t got = pread(fd, buf, want, (off_t)(offset + done));
        if (got < 0 && errno == EINTR) {
            continue;
        }
        if (got <= 0) {
            return got < 0 ? errno : EIO;  // EIO: the file ended early
        }
        h = fnv_update(h, buf, (size_t)got);
        for (ssize_t put = 0; out >= 0 && put < got;) {
            ssize_t n = write(out, buf + put, (size_t)(got - put));
            if (n < 0 && errno == EINTR) {
                continue;
            }
            if (n < 0) {
                return errno;
            }
            put += n;
        }
        done += (uint64_t)got;
    }
    *hash = h;
    return 0;
}

static void fail(struct job * job, const char * what, int err) {
    job->state = STATE_FAILED;
    snprintf(job->error, sizeof(job->error), "%s: %s", what, strerror(err));
}

static void seed_one(struct job * job, uint8_t * buf) {
    int err = stream(g.model_fd, job->offset, job->size, -1, buf, &job->hash);
    if (err) {
        fail(job, "reading the model", err);
        return;
    }
    char file[17];
    snprintf(file, sizeof(file), "%016" PRIx64, job->hash);
    struct stat st;
    bool there = fstatat(g.cache_fd, file, &st, 0) == 0;
    if (there && S_ISREG(st.st_mode) && (uint64_t)st.st_size == job->size) {
        job->state = STATE_PRESENT;
        if (!g.verify) {
            return;
        }
        uint64_t cached;
        int fd = openat(g.cache_fd, file, O_RDONLY | O_CLOEXEC);
        if (fd >= 0 && stream(fd, 0, job->size, -1, buf, &cached) == 0 && cached == job->hash) {
            close(fd);
            return;
        }
        if (fd >= 0) {
            close(fd);
        }
    }
    bool replace = there;
    if (g.dry_run) {
        job->state = STATE_WOULD_WRITE;
        return;
    }
    char tmp[64];
    snprintf(tmp, sizeof(tmp), ".%s.seed-%ld-%zu", file, (long)getpid(), (size_t)(job - g.jobs));
    int out = openat(g.cache_fd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (out < 0) {
        fail(job, "creating a file in the cache folder", errno);
        return;
    }
    uint64_t again;
    err = stream(g.model_fd, job->offset, job->size, out, buf, &again);
    if (!err && again != job->hash) {
        err = ESTALE;  // the model changed while it was read
    }
    if (!err && fsync(out) != 0) {
        err = errno;
    }
    if (close(out) != 0 && !err) {
        err = errno;
    }
    if (!err && renameat(g.cache_fd, tmp, g.cache_fd, file) != 0) {
        err = errno;
    }
    if (err) {
        unlinkat(g.cache_fd, tmp, 0);
        fail(job, "writing the cache file", err);
        return;
    }
    job->state = replace ? STATE_REPLACED : STATE_WRITTEN;
}

static void * worker(void * arg) {
    (void)arg;
    uint8_t * buf = malloc(CHUNK);
    for (;;) {
        pthread_mutex_lock(&g.lock);
        size_t i = g.next < g.n_jobs ? g.next++ : g.n_jobs;
        pthread_mutex_unlock(&g.lock);
        if (i == g.n_jobs) {
            break;
        }
        if (!buf) {
            fail(&g.jobs[i], "allocating a read buffer", ENOMEM);
            continue;
        }
        seed_one(&g.jobs[i], buf);
    }
    free(buf);
    return NULL;
}

static void json_string(FILE * f, const char * s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            fprintf(f, "\\%c", c);
        } else if (c < 0x20) {
            fprintf(f, "\\u%04x", c);
        } else {
            fputc(c, f);
        }
    }
    fputc('"', f);
}

// mkdir -p, as ggml-rpc-server makes its own cache folder. 0 or -1 with errno set.
static int make_folders(const char * path) {
    char buf[4096];
    if (strlen(path) >= sizeof(buf)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(buf, path);
    for (char * p = buf + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(buf, 0755) != 0 && errno != EEXIST) {
                return -1;
            }
            *p = '/';
        }
    }
    return mkdir(buf, 0755) != 0 && errno != EEXIST ? -1 : 0;
}

static int usage(void) {
    fprintf(stderr, "usage: llama-rpc-seed [--tensors FILE] [--threads N] [--verify] [--dry-run] [--list] [--] "
                    "MODEL.gguf CACHE_DIR | --format | --version\n");
    return 2;
}

// The names in FILE (one a line; blank lines and # comments skipped), each one a tensor of the model.
// Marks them in `wanted`; 0, or 2 after saying what is wrong.
static int read_tensor_list(const char * path, const struct gguf_context * ctx, bool * wanted) {
    FILE * f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "llama-rpc-seed: --tensors %s: %s\n", path, strerror(errno));
        return 2;
    }
    char line[512];
    int lineno = 0, rc = 0;
    while (fgets(line, sizeof(line), f)) {
        lineno++;
        size_t n = strcspn(line, "\r\n");
        if (line[n] == '\0' && !feof(f)) {
            fprintf(stderr, "llama-rpc-seed: %s:%d: line too long for a tensor name\n", path, lineno);
            rc = 2;
            break;
        }
        line[n] = '\0';
        char * name = line + strspn(line, " \t");
        for (char * end = name + strlen(name); end > name && (end[-1] == ' ' || end[-1] == '\t');) {
            *--end = '\0';
        }
        if (*name == '\0' || *name == '#') {
            continue;
        }
        int64_t id = gguf_find_tensor(ctx, name);
        if (id < 0) {
            fprintf(stderr, "llama-rpc-seed: %s:%d: the model has no tensor named '%s'\n", path, lineno, name);
            rc = 2;
            break;
        }
        wanted[id] = true;
    }
    fclose(f);
    return rc;
}

int main(int argc, char ** argv) {
    const char * tensors = NULL;
    long threads = sysconf(_SC_NPROCESSORS_ONLN);
    bool list = false;
    int i = 1;
    if (argc == 2 && strcmp(argv[1], "--version") == 0) {
        printf("llama-rpc-seed: ggml-rpc-server cache files for tensors over %" PRIu64 " bytes, "
               "named by the FNV-1a 64 of their bytes\n", RPC_HASH_THRESHOLD);
        return 0;
    }
    if (argc == 2 && strcmp(argv[1], "--format") == 0) {
        printf("{\"hash\": \"fnv1a64\", \"offset_basis\": \"%016llx\", \"prime\": \"%016llx\", "
               "\"threshold_bytes\": %" PRIu64 ", \"name\": \"%%016x\"}\n", FNV_OFFSET_BASIS, FNV_PRIME,
               RPC_HASH_THRESHOLD);
        return 0;
    }
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (strcmp(argv[i], "--") == 0) {
            i++;
            break;
        } else if (strcmp(argv[i], "--tensors") == 0 && i + 1 < argc) {
            tensors = argv[++i];
        } else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
            char * end;
            threads = strtol(argv[++i], &end, 10);
            if (*end != '\0' || threads < 1 || threads > MAX_THREADS) {
                fprintf(stderr, "llama-rpc-seed: --threads takes a number from 1 to %d\n", MAX_THREADS);
                return 2;
            }
        } else if (strcmp(argv[i], "--verify") == 0) {
            g.verify = true;
        } else if (strcmp(argv[i], "--dry-run") == 0) {
            g.dry_run = true;
        } else if (strcmp(argv[i], "--list") == 0) {
            list = true;
        } else {
            return usage();
        }
    }
    if (argc - i != 2) {
        return usage();
    }
    const char * model = argv[i];
    g.cache_dir = argv[i + 1];
    if (threads < 1) {
        threads = 1;
    } else if (threads > MAX_THREADS) {
        threads = MAX_THREADS;
    }

    g.model_fd = open(model, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (g.model_fd < 0 || fstat(g.model_fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        fprintf(stderr, "llama-rpc-seed: %s: %s\n", model, g.model_fd < 0 ? strerror(errno) : "not a file");
        return 2;
    }
    struct gguf_init_params params = {.no_alloc = true, .ctx = NULL};
    struct gguf_context * ctx = gguf_init_from_file(model, params);
    if (!ctx) {
        fprintf(stderr, "llama-rpc-seed: %s: not a GGUF file llama.cpp can read\n", model);
        return 2;
    }
    if (!g.dry_run && make_folders(g.cache_dir) != 0) {
        fprintf(stderr, "llama-rpc-seed: cannot create the cache folder %s: %s\n", g.cache_dir, strerror(errno));
        return 1;
    }
    g.cache_fd = open(g.cache_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (g.cache_fd < 0 && !(g.dry_run && errno == ENOENT)) {
        fprintf(stderr, "llama-rpc-seed: cache folder %s: %s\n", g.cache_dir, strerror(errno));
        return g.dry_run ? 2 : 1;
    }

    int64_t n = gguf_get_n_tensors(ctx);
    bool * wanted = calloc((size_t)n + 1, sizeof(bool));
    g.jobs = calloc((size_t)n + 1, sizeof(struct job));
    if (!wanted || !g.jobs) {
        fprintf(stderr, "llama-rpc-seed: out of memory\n");
        return 1;
    }
    if (tensors) {
        int rc = read_tensor_list(tensors, ctx, wanted);
        if (rc) {
            return rc;
        }
    }
    uint64_t data = gguf_get_data_offset(ctx), small = 0, large_bytes = 0;
    for (int64_t t = 0; t < n; t++) {
        if (tensors && !wanted[t]) {
            continue;
        }
        uint64_t offset = data + gguf_get_tensor_offset(ctx, t), size = gguf_get_tensor_size(ctx, t);
        if (offset > (uint64_t)st.st_size || size > (uint64_t)st.st_size - offset) {
            fprintf(stderr, "llama-rpc-seed: %s: tensor '%s' lies past the end of the file (truncated?)\n", model,
                    gguf_get_tensor_name(ctx, t));
            return 2;
        }
        if (size <= RPC_HASH_THRESHOLD) {
            small++;  // the head sends these itself, every load
            continue;
        }
        g.jobs[g.n_jobs++] = (struct job){.name = gguf_get_tensor_name(ctx, t), .offset = offset, .size = size};
        large_bytes += size;
    }

    if (g.cache_fd < 0) {  // --dry-run with no cache folder yet: everything would be written
        for (size_t j = 0; j < g.n_jobs; j++) {
            uint8_t * buf = malloc(CHUNK);
            int err = buf ? stream(g.model_fd, g.jobs[j].offset, g.jobs[j].size, -1, buf, &g.jobs[j].hash) : ENOMEM;
            free(buf);
            if (err) {
                fail(&g.jobs[j], "reading the model", err);
            } else {
                g.jobs[j].state = STATE_WOULD_WRITE;
            }
        }
    } else {
        pthread_t ids[MAX_THREADS];
        long started = 0;
        for (; started < threads && (size_t)started < g.n_jobs; started++) {
            if (pthread_create(&ids[started], NULL, worker, NULL) != 0) {
                break;
            }
        }
        if (started == 0) {
            worker(NULL);
        }
        for (long t = 0; t < started; t++) {
            pthread_join(ids[t], NULL);
        }
        if (!g.dry_run) {
            fsync(g.cache_fd);  // the renames, on disk
        }
    }

    size_t counts[5] = {0};
    uint64_t written_bytes = 0;
    for (size_t j = 0; j < g.n_jobs; j++) {
        struct job * job = &g.jobs[j];
        counts[job->state]++;
        if (job->state == STATE_WRITTEN || job->state == STATE_REPLACED) {
            written_bytes += job->size;
        }
        if (job->state == STATE_FAILED) {
            fprintf(stderr, "llama-rpc-seed: %s: %s\n", job->name, job->error);
        }
        if (list) {
            printf("{\"tensor\": ");
            json_string(stdout, job->name);
            printf(", \"file\": \"%016" PRIx64 "\", \"bytes\": %" PRIu64 ", \"state\": \"%s\"}\n", job->hash,
                   job->size, STATE_NAMES[job->state]);
        }
    }
    printf("{\"model\": ");
    json_string(stdout, model);
    printf(", \"cache\": ");
    json_string(stdout, g.cache_dir);
    printf(", \"large\": %zu, \"large_bytes\": %" PRIu64 ", \"written\": %zu, \"replaced\": %zu, "
           "\"present\": %zu, \"would_write\": %zu, \"failed\": %zu, \"written_bytes\": %" PRIu64
           ", \"small\": %" PRIu64 ", \"threshold_bytes\": %" PRIu64 "}\n",
           g.n_jobs, large_bytes, counts[STATE_WRITTEN], counts[STATE_REPLACED], counts[STATE_PRESENT],
           counts[STATE_WOULD_WRITE], counts[STATE_FAILED], written_bytes, small, RPC_HASH_THRESHOLD);
    gguf_free(ctx);
    return counts[STATE_FAILED] ? 1 : 0;
}
