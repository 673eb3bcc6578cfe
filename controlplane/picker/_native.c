/* controlplane.picker._native: the endpoint picker's engine in C (docs/routing.md).
 *
 * The decision (a port of service.Picker.decide/choose, scheduler.rank, prefix.PrefixIndex,
 * load.Load and prompt.prompt_text/block_hashes) and ext_proc's HTTP transport (a port of
 * http_service.Exchange/answer and http1.py's framing), served on a pthread of its own that
 * never takes Python's GIL: a request costs no Python at all. Python still reads the
 * endpoints' metrics and pushes them in (Engine.read); its gRPC transport calls decide().
 *
 * One mutex guards the decision state (the endpoints, their prefix sets, the counters).
 * Methods called from Python copy or pin their inputs, then release the GIL around anything
 * that takes the mutex or does real work.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_DEPTH 128            /* JSON nested deeper is refused as invalid */
#define MAX_HEAD (16 * 1024)     /* http1.MAX_HEAD_BYTES; also bounds a chunked trailer */
#define MAX_MESSAGE (64u << 20)  /* http_service.MAX_MESSAGE_BYTES */
#define MAX_CHUNK_LINE 1024
#define MAX_CONNS 1024
#define READ_SIZE (64 * 1024)
#define ARENA_CHUNK (64 * 1024)
#define BIG_BUFFER (1u << 20)    /* an idle connection's buffer beyond this is freed */
#define NBUCKETS 11
#define CHARS_PER_TOKEN 4

static const double BOUNDS[NBUCKETS - 1] = {0.00005, 0.0001, 0.0002, 0.0005, 0.001,
                                            0.002,   0.005,  0.01,   0.025,  0.1};
enum { R_PREFIX, R_LOAD, R_NONE };
static const char *const REASONS[] = {"prefix", "load", "none"};

typedef struct { const char *s; size_t n; } Str;
typedef struct { const uint8_t *s, *e; } Span; /* a JSON value's source text; s NULL: absent */
#define S(lit) {lit, sizeof lit - 1} /* a Str of a literal: S("x") in initializers, */
#define STR(lit) ((Str)S(lit))           /* STR("x") elsewhere */

static double monotonic(void) { /* the clock of Python's time.monotonic() */
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* ---- arena: a request's allocations, freed at once ------------------------------------ */

typedef struct Chunk { struct Chunk *next; size_t cap, used; _Alignas(16) uint8_t data[]; } Chunk;
typedef struct { Chunk *head; } Arena;

static void *arena_alloc(Arena *a, size_t n) {
    if (n > SIZE_MAX / 2) return NULL;
    n = (n + 15) & ~(size_t)15;
    Chunk *c = a->head;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > ARENA_CHUNK ? n : ARENA_CHUNK;
        if (!(c = malloc(sizeof *c + cap))) return NULL;
        c->cap = cap, c->used = 0, c->next = a->head, a->head = c;
    }
    c->used += n;
    return c->data + c->used - n;
}

static void arena_reset(Arena *a) { /* keeps the first (small) chunk for the next request */
    Chunk *keep = NULL;
    for (Chunk *c = a->head, *next; c; c = next) {
        next = c->next;
        if (!next && c->cap == ARENA_CHUNK) keep = c, keep->used = 0;
        else free(c);
    }
    a->head = keep;
}

static void arena_free(Arena *a) { arena_reset(a), free(a->head), a->head = NULL; }

/* ---- JSON: validated in one pass, then navigated by skipping over the source ----------- */
/* No tree is built: a hostile body of millions of values costs no memory. */

static const uint8_t *ws(const uint8_t *p, const uint8_t *e) {
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

static int hexval(uint8_t c) {
    return c >= '0' && c <= '9' ? c - '0' : (c | 32) >= 'a' && (c | 32) <= 'f' ? (c | 32) - 'a' + 10 : -1;
}

static long hex4(const uint8_t *p) {
    long v = 0;
    for (int i = 0, d; i < 4; i++, v = v * 16 + d)
        if ((d = hexval(p[i])) < 0) return -1;
    return v;
}

/* The length of the valid UTF-8 sequence at p (lead byte >= 0x80), 0 if invalid: as
 * json.loads(bytes) decodes (utf-8, surrogatepass): no overlong, nothing > U+10FFFF. */
static int utf8_len(const uint8_t *p, const uint8_t *e) {
    uint8_t c = p[0];
    int n = c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    if (c < 0xC2 || c > 0xF4 || e - p < n) return 0;
    for (int i = 1; i < n; i++)
        if ((p[i] & 0xC0) != 0x80) return 0;
    if ((c == 0xE0 && p[1] < 0xA0) || (c == 0xF0 && p[1] < 0x90) || (c == 0xF4 && p[1] >= 0x90)) return 0;
    return n;
}

/* Past the bytes of a string that need no look: not '"', '\\', a control or non-ASCII byte.
 * Eight at a time (the base64 body is most of a ProcessingRequest); false alarms go bytewise. */
static const uint8_t *scan_plain(const uint8_t *p, const uint8_t *e) {
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    for (;;) {
        for (uint64_t x, q, b; e - p >= 8; p += 8) {
            memcpy(&x, p, 8);
            q = x ^ (ones * '"'), b = x ^ (ones * '\\');
            if ((((q - ones) & ~q) | ((b - ones) & ~b) | (x - ones * 0x20) | x) & highs) break;
        }
        for (const uint8_t *stop = e - p >= 8 ? p + 8 : e; p < stop; p++)
            if (*p < 0x20 || *p >= 0x80 || *p == '"' || *p == '\\') return p;
        if (p == e) return p;
    }
}

static const uint8_t *skip_string(const uint8_t *p, const uint8_t *e) { /* p at '"' */
    for (p++;;) {
        if ((p = scan_plain(p, e)) >= e) return NULL;
        if (*p == '"') return p + 1;
        if (*p == '\\') {
            if (e - p >= 6 && p[1] == 'u' && hex4(p + 2) >= 0) p += 6;
            else if (e - p >= 2 && p[1] && p[1] != 'u' && strchr("\"\\/bfnrt", p[1])) p += 2;
            else return NULL;
        } else {
            int n = *p < 0x20 ? 0 : utf8_len(p, e);
            if (!n) return NULL;
            p += n;
        }
    }
}

static const uint8_t *skip_digits(const uint8_t *p, const uint8_t *e) {
    while (p < e && *p >= '0' && *p <= '9') p++;
    return p;
}

static const uint8_t *skip_word(const uint8_t *p, const uint8_t *e, const char *w) {
    size_t n = strlen(w);
    return (size_t)(e - p) >= n && !memcmp(p, w, n) ? p + n : NULL;
}

/* Python's json: -?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?, and NaN, Infinity, -Infinity. */
static const uint8_t *skip_number(const uint8_t *p, const uint8_t *e) {
    const uint8_t *q;
    if (p < e && *p == '-' && ++p < e && *p == 'I') return skip_word(p, e, "Infinity");
    if (p >= e || *p < '0' || *p > '9') return NULL;
    p = *p == '0' ? p + 1 : skip_digits(p, e);
    if (p < e && *p == '.') {
        if ((q = skip_digits(p + 1, e)) == p + 1) return NULL;
        p = q;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        p += p + 1 < e && (p[1] == '+' || p[1] == '-') ? 2 : 1;
        if ((q = skip_digits(p, e)) == p) return NULL;
        p = q;
    }
    return p;
}

static const uint8_t *skip_value(const uint8_t *p, const uint8_t *e, int depth) { /* validates */
    if (p >= e) return NULL;
    switch (*p) {
    case '"': return skip_string(p, e);
    case 't': return skip_word(p, e, "true");
    case 'f': return skip_word(p, e, "false");
    case 'n': return skip_word(p, e, "null");
    case 'N': return skip_word(p, e, "NaN");
    case 'I': return skip_word(p, e, "Infinity");
    case '{':
    case '[': {
        uint8_t close = *p == '{' ? '}' : ']';
        if (depth >= MAX_DEPTH) return NULL;
        if ((p = ws(p + 1, e)) < e && *p == close) return p + 1;
        for (;;) {
            if (close == '}') { /* a key, then ':' */
                if (p >= e || *p != '"' || !(p = skip_string(p, e))) return NULL;
                if ((p = ws(p, e)) >= e || *p != ':') return NULL;
                p = ws(p + 1, e);
            }
            if (!(p = skip_value(p, e, depth + 1)) || (p = ws(p, e)) >= e) return NULL;
            if (*p == close) return p + 1;
            if (*p != ',') return NULL;
            p = ws(p + 1, e);
        }
    }
    default: return skip_number(p, e);
    }
}

/* The whole document is one value, between whitespace; s NULL if it is not JSON. */
static Span parse_document(const uint8_t *p, size_t n) {
    const uint8_t *e = p + n, *end;
    if (n >= 3 && !memcmp(p, "\xEF\xBB\xBF", 3)) p += 3; /* json.loads(bytes): utf-8-sig */
    p = ws(p, e);
    if (!(end = skip_value(p, e, 0)) || ws(end, e) != e) return (Span){NULL, NULL};
    return (Span){p, end};
}

/* Past a string of validated JSON: its quote is the first after an even run of backslashes. */
static const uint8_t *skip_string_fast(const uint8_t *p, const uint8_t *e) {
    for (const uint8_t *q = p + 1;; q++) {
        const uint8_t *b = q = memchr(q, '"', (size_t)(e - q));
        while (b[-1] == '\\') b--;
        if ((q - b) % 2 == 0) return q + 1;
    }
}

/* Past a value of validated JSON, without checking it again: what navigating costs. */
static const uint8_t *skip_fast(const uint8_t *p, const uint8_t *e) {
    for (int depth = 0;;) {
        if (*p == '"') p = skip_string_fast(p, e);
        else if (*p == '{' || *p == '[') depth++, p++;
        else if (*p == '}' || *p == ']') depth--, p++;
        else /* a number, a word, or punctuation */
            do p++; while (p < e && !strchr(",:]} \t\r\n\"{[", *p));
        if (depth == 0 || p >= e) return p;
    }
}

/* The next member of a validated object (*it starts at its '{'): the key's raw text
 * between its quotes, and the value. */
static int obj_next(const uint8_t **it, const uint8_t *end, Span *key, Span *val) {
    const uint8_t *p = *it;
    if (*p == '}' || (p = ws(p + 1, end), *p == '}')) return 0;
    key->s = p + 1;
    key->e = (p = skip_string_fast(p, end)) - 1;
    val->s = p = ws(ws(p, end) + 1, end);
    val->e = p = skip_fast(p, end);
    *it = ws(p, end);
    return 1;
}

static int arr_next(const uint8_t **it, const uint8_t *end, Span *item) { /* as obj_next */
    const uint8_t *p = *it;
    if (*p == ']' || (p = ws(p + 1, end), *p == ']')) return 0;
    item->s = p;
    item->e = p = skip_fast(p, end);
    *it = ws(p, end);
    return 1;
}

static int utf8_put(uint8_t *o, uint32_t u) { /* lone surrogates as 3 bytes, like Python */
    if (u < 0x80) return o[0] = (uint8_t)u, 1;
    if (u < 0x800) return o[0] = 0xC0 | u >> 6, o[1] = 0x80 | (u & 63), 2;
    if (u < 0x10000) return o[0] = 0xE0 | u >> 12, o[1] = 0x80 | (u >> 6 & 63), o[2] = 0x80 | (u & 63), 3;
    o[0] = 0xF0 | u >> 18, o[1] = 0x80 | (u >> 12 & 63), o[2] = 0x80 | (u >> 6 & 63);
    return o[3] = 0x80 | (u & 63), 4;
}

/* The character of the (validated) escape at *pp, UTF-8 into o; a \u surrogate pair is one
 * character, as in Python's json. */
static int unescape(const uint8_t **pp, const uint8_t *e, uint8_t *o) {
    const uint8_t *p = *pp;
    int n = 1;
    switch (p[1]) {
    case 'b': *o = '\b'; break;
    case 'f': *o = '\f'; break;
    case 'n': *o = '\n'; break;
    case 'r': *o = '\r'; break;
    case 't': *o = '\t'; break;
    case 'u': {
        uint32_t u = (uint32_t)hex4(p + 2);
        long low;
        p += 4;
        if (u >= 0xD800 && u < 0xDC00 && e - p >= 8 && p[2] == '\\' && p[3] == 'u' &&
            (low = hex4(p + 4)) >= 0xDC00 && low < 0xE000)
            u = 0x10000 + ((u - 0xD800) << 10) + (uint32_t)(low - 0xDC00), p += 6;
        n = utf8_put(o, u);
        break;
    }
    default: *o = p[1]; /* " \ / */
    }
    *pp = p + 2;
    return n;
}

/* A validated string's raw text [s, e) decoded into o (room for e - s bytes: never more). */
static size_t str_decode(const uint8_t *s, const uint8_t *e, uint8_t *o) {
    size_t n = 0;
    while (s < e) {
        const uint8_t *b = memchr(s, '\\', (size_t)(e - s));
        size_t plain = (size_t)((b ? b : e) - s);
        memcpy(o + n, s, plain);
        n += plain, s += plain;
        if (b) n += (size_t)unescape(&s, e, o + n);
    }
    return n;
}

/* Whether a raw key decodes to lit (prefix: starts with it); escapes are rare. */
static int key_match(Span k, Str lit, int prefix) {
    size_t raw = (size_t)(k.e - k.s), i = 0;
    if (!memchr(k.s, '\\', raw)) return (prefix ? raw >= lit.n : raw == lit.n) && !memcmp(k.s, lit.s, lit.n);
    for (const uint8_t *p = k.s; p < k.e && !(prefix && i >= lit.n);) {
        uint8_t c[4];
        size_t m = *p == '\\' ? (size_t)unescape(&p, k.e, c) : (c[0] = *p++, 1);
        if (i + m > lit.n || memcmp(c, lit.s + i, m)) return 0;
        i += m;
    }
    return i == lit.n;
}

/* The values of keys in a validated object, in one pass; a duplicate key: the last wins,
 * as in a Python dict. Not an object: all absent. */
static void obj_get(Span obj, const Str *keys, int nkeys, Span *out) {
    Span k, v;
    for (int j = 0; j < nkeys; j++) out[j] = (Span){NULL, NULL};
    if (!obj.s || *obj.s != '{') return;
    for (const uint8_t *it = obj.s; obj_next(&it, obj.e, &k, &v);)
        for (int j = 0; j < nkeys; j++)
            if (key_match(k, keys[j], 0)) out[j] = v;
}

static Span obj_get1(Span obj, const char *key) {
    Span v;
    obj_get(obj, &(Str){key, strlen(key)}, 1, &v); /* a literal: its strlen is folded */
    return v;
}

/* A string value decoded: its source when it has no escape, else a copy in the arena. */
static int str_value(Span v, Arena *a, Str *out) {
    const uint8_t *s = v.s + 1, *e = v.e - 1;
    uint8_t *o;
    if (!memchr(s, '\\', (size_t)(e - s))) return *out = (Str){(const char *)s, (size_t)(e - s)}, 0;
    if (!(o = arena_alloc(a, (size_t)(e - s)))) return -1;
    *out = (Str){(const char *)o, str_decode(s, e, o)};
    return 0;
}

static int truthy(Span v) { /* Python's truth: "", [], {}, 0, false, null are false */
    switch (*v.s) {
    case '"': return v.e - v.s > 2;
    case '[':
    case '{': return *ws(v.s + 1, v.e) != (*v.s == '[' ? ']' : '}');
    case 'f':
    case 'n': return 0;
    case 't':
    case 'N':
    case 'I': return 1;
    }
    for (const uint8_t *p = v.s; p < v.e && *p != 'e' && *p != 'E'; p++)
        if ((*p >= '1' && *p <= '9') || *p == 'I') return 1;
    return 0;
}

/* ---- the prompt: its text and its blocks (prompt.py) ---------------------------------- */

typedef struct { uint8_t *p; size_t n; int parts; } Text; /* "\n".join(parts) */

static void text_part(Text *t, Span v, int string) { /* v.s NULL: an empty part */
    if (t->parts++) t->p[t->n++] = '\n';
    if (v.s && string) t->n += str_decode(v.s + 1, v.e - 1, t->p + t->n);
    else if (v.s) memcpy(t->p + t->n, v.s, (size_t)(v.e - v.s)), t->n += (size_t)(v.e - v.s);
}

/* prompt.prompt_text into out (room for n bytes: the text is never longer than the body,
 * each part being a value in it and each "\n" a separator in it); "" if not JSON. */
static size_t prompt_text(const uint8_t *body, size_t n, uint8_t *out) {
    static const Str top[2] = {S("messages"), S("prompt")}, message[2] = {S("role"), S("content")};
    Span doc = parse_document(body, n), got[2], rc[2], item, part, text, none = {NULL, NULL};
    Text t = {out, 0, 0};
    if (!doc.s || *doc.s != '{') return 0;
    obj_get(doc, top, 2, got);
    if (got[0].s && *got[0].s == '[') {
        for (const uint8_t *it = got[0].s; arr_next(&it, got[0].e, &item);) {
            if (*item.s != '{') continue;
            obj_get(item, message, 2, rc); /* role (or ""), then the content's text parts */
            text_part(&t, rc[0].s && *rc[0].s == '"' ? rc[0] : none, 1);
            if (rc[1].s && *rc[1].s == '"') text_part(&t, rc[1], 1);
            else if (rc[1].s && *rc[1].s == '[')
                for (const uint8_t *jt = rc[1].s; arr_next(&jt, rc[1].e, &part);)
                    if (*part.s == '{' && (text = obj_get1(part, "text")).s && *text.s == '"')
                        text_part(&t, text, 1);
        }
    } else if (got[1].s && *got[1].s == '"') {
        text_part(&t, got[1], 1);
    } else if (got[1].s && *got[1].s == '[') { /* items not strings: their JSON text */
        for (const uint8_t *it = got[1].s; arr_next(&it, got[1].e, &item);)
            text_part(&t, item, *item.s == '"');
    }
    return t.n;
}

static uint64_t rotl(uint64_t x, int r) { return x << r | x >> (64 - r); }

static uint64_t fmix64(uint64_t k) { /* murmur3's finalizer */
    k ^= k >> 33, k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33, k *= 0xc4ceb9fe1a85ec53ULL;
    return k ^ (k >> 33);
}

/* Drawn at import: the chains start from it, so nobody outside this process can choose
 * prompts whose blocks collide in the prefix sets (prompt.py's hash is salted likewise). */
static uint64_t HASH_SEED;

/* A block's hash chained on the one before: murmur3-x64's mixing, eight bytes at a time,
 * seeded with the previous hash and the length, then finalized. */
static uint64_t hash_block(uint64_t prev, const uint8_t *p, size_t n) {
    const uint64_t c1 = 0x87c37b91114253d5ULL, c2 = 0x4cf5ad432745937fULL;
    uint64_t h = fmix64(prev ^ 0x9e3779b97f4a7c15ULL) ^ (n * c2), k;
    for (; n >= 8; n -= 8, p += 8) {
        memcpy(&k, p, 8);
        h ^= rotl(k * c1, 31) * c2;
        h = rotl(h, 27) * 5 + 0x52dce729;
    }
    if (n) k = 0, memcpy(&k, p, n), h ^= rotl(k * c1, 31) * c2;
    return fmix64(h);
}

typedef struct {
    size_t block_chars, max_blocks, capacity_blocks;
    double cache_tokens, w_prefix, w_queue, w_kv, queue_unit, default_fade;
} Config;

/* prompt.block_hashes of the body's prompt text (in the arena), and its tokens. */
static int blocks_of(const Config *cf, const uint8_t *body, size_t n, Arena *a, uint64_t **hashes,
                     size_t *count, size_t *tokens) {
    uint8_t *t = arena_alloc(a, n + 1);
    uint64_t *h, prev = HASH_SEED, x, ones = 0x0101010101010101ULL;
    *hashes = NULL, *count = *tokens = 0;
    if (!t) return -1;
    size_t len = prompt_text(body, n, t), chars = len, i = 0, blocks;
    for (; i + 8 <= len; i += 8) { /* code points: the bytes but continuations (10xxxxxx) */
        memcpy(&x, t + i, 8);
        chars -= (size_t)((((x & ~(x << 1)) >> 7 & ones) * ones) >> 56);
    }
    for (; i < len; i++) chars -= (t[i] & 0xC0) == 0x80;
    *tokens = chars / CHARS_PER_TOKEN;
    if ((blocks = chars / cf->block_chars) > cf->max_blocks) blocks = cf->max_blocks;
    if (!blocks) return 0;
    if (!(h = arena_alloc(a, blocks * sizeof *h))) return -1;
    const uint8_t *p = t, *q, *end = t + len;
    for (i = 0; i < blocks; i++, p = q) {
        q = p + cf->block_chars; /* all ASCII: a character is a byte */
        if (chars != len) /* else block_chars code points: past each one's lead byte */
            for (size_t k = (q = p, 0); k < cf->block_chars; k++)
                for (q++; q < end && (*q & 0xC0) == 0x80;) q++;
        h[i] = prev = hash_block(prev, p, (size_t)(q - p));
    }
    *hashes = h, *count = blocks;
    return 0;
}

/* ---- an endpoint's prefix set (prefix.PrefixIndex): a hash set + an LRU list ----------- */

typedef struct { uint64_t key; uint32_t node; } Slot;         /* node 0: an empty slot */
typedef struct { uint64_t key; uint32_t older, newer; } Node; /* node 0: the list's sentinel */
typedef struct {
    Slot *slots;
    size_t mask;         /* linear probing, at most half full */
    Node *nodes;         /* nodes[0].newer: the least recent; .older: the most recent */
    uint32_t used, cap;  /* nodes allocated so far / room */
    uint32_t free, size; /* free nodes, chained by .newer */
} Prefix;

static uint32_t px_find(const Prefix *x, uint64_t key, size_t *at) { /* *at: its slot, or where */
    if (!x->slots) return 0;
    for (size_t i = key & x->mask;; i = (i + 1) & x->mask)
        if (!x->slots[i].node || x->slots[i].key == key) {
            if (at) *at = i;
            return x->slots[i].node;
        }
}

static void px_unlink(Prefix *x, uint32_t n) {
    x->nodes[x->nodes[n].older].newer = x->nodes[n].newer;
    x->nodes[x->nodes[n].newer].older = x->nodes[n].older;
}

static void px_link_newest(Prefix *x, uint32_t n) {
    x->nodes[n].older = x->nodes[0].older, x->nodes[n].newer = 0;
    x->nodes[x->nodes[0].older].newer = n, x->nodes[0].older = n;
}

static int px_insert(Prefix *x, uint64_t key) {
    size_t at = 0, j;
    uint32_t n = x->free;
    if (!x->slots || (x->size + 1) * 2 > x->mask + 1) { /* grow the table, rehash */
        size_t cap = x->slots ? (x->mask + 1) * 2 : 64;
        Slot *s = calloc(cap, sizeof *s);
        if (!s) return -1;
        for (size_t i = 0; x->slots && i <= x->mask; i++)
            if (x->slots[i].node) {
                for (j = x->slots[i].key & (cap - 1); s[j].node; j = (j + 1) & (cap - 1)) {}
                s[j] = x->slots[i];
            }
        free(x->slots);
        x->slots = s, x->mask = cap - 1;
    }
    if (n) {
        x->free = x->nodes[n].newer;
    } else {
        if (x->used == x->cap) {
            uint32_t cap = x->cap ? x->cap * 2 : 64;
            Node *m = realloc(x->nodes, cap * sizeof *m);
            if (!m) return -1;
            if (!x->cap) m[0] = (Node){0, 0, 0}, x->used = 1;
            x->nodes = m, x->cap = cap;
        }
        n = x->used++;
    }
    px_find(x, key, &at);
    x->slots[at] = (Slot){key, n};
    x->nodes[n].key = key;
    px_link_newest(x, n);
    x->size++;
    return 0;
}

static void px_evict_oldest(Prefix *x) {
    uint32_t n = x->nodes[0].newer;
    size_t i = 0, j, home;
    px_find(x, x->nodes[n].key, &i);
    for (j = (i + 1) & x->mask; x->slots[j].node; j = (j + 1) & x->mask) { /* backward shift: */
        home = x->slots[j].key & x->mask; /* probe chains stay whole, without tombstones */
        if (((j - home) & x->mask) >= ((j - i) & x->mask)) x->slots[i] = x->slots[j], i = j;
    }
    x->slots[i].node = 0;
    px_unlink(x, n);
    x->nodes[n].newer = x->free, x->free = n, x->size--;
}

static void px_clear(Prefix *x) { free(x->slots), free(x->nodes), memset(x, 0, sizeof *x); }

/* The largest k with hashes[k-1] there: a chain is recorded last to first, so an endpoint
 * that has block k has every block before it (PrefixIndex.matched). */
static size_t px_matched(const Prefix *x, const uint64_t *h, size_t n) {
    size_t low = 0, high = x->size ? n : 0, mid;
    while (low < high)
        if (px_find(x, h[(mid = (low + high + 1) / 2) - 1], NULL)) low = mid;
        else high = mid - 1;
    return low;
}

/* PrefixIndex.record: the first block last, the most recent; then the LRU's limit. Out of
 * memory, the rest of the chain is not remembered (a guess of the server's cache anyway). */
static void px_record(Prefix *x, const uint64_t *h, size_t n, size_t capacity) {
    for (size_t i = n; i-- > 0;) {
        uint32_t node = px_find(x, h[i], NULL);
        if (node) px_unlink(x, node), px_link_newest(x, node);
        else if (px_insert(x, h[i])) break;
    }
    while (x->size > capacity) px_evict_oldest(x);
}

/* ---- the endpoints and pools, by name: chained hash tables ---------------------------- */

typedef struct Entry { struct Entry *next; uint64_t hash; const char *name; size_t len; } Entry;
typedef struct { Entry **b; size_t mask, count; } Table;

typedef struct {
    Entry e;
    int up;
    double waiting, running, kv_cache, read_at, stay_s; /* stay_s <= 0: not measured yet */
    double sent, sent_at, named_at;
    long long sent_tokens;
    Prefix prefix;
} Endpoint;

typedef struct { Entry e; uint64_t picks[3], prompt_blocks, matched_blocks; int blocks_counted; } Pool;

static uint64_t str_hash(const char *s, size_t n) { /* FNV-1a: names are short */
    uint64_t h = 0xcbf29ce484222325ULL;
    while (n--) h = (h ^ (uint8_t)*s++) * 0x100000001b3ULL;
    return h;
}

static Entry *tb_find(const Table *t, const char *s, size_t n) {
    uint64_t h = str_hash(s, n);
    for (Entry *e = t->b ? t->b[h & t->mask] : NULL; e; e = e->next)
        if (e->hash == h && e->len == n && !memcmp(e->name, s, n)) return e;
    return NULL;
}

/* Found, or created zeroed (`size` bytes, the name after them); NULL out of memory. */
static Entry *tb_get(Table *t, const char *s, size_t n, size_t size, int *created) {
    Entry *e = tb_find(t, s, n);
    char *m;
    if (e) return e;
    if (!t->b || t->count >= t->mask + 1) { /* grow; out of memory, chains grow instead */
        size_t cap = t->b ? (t->mask + 1) * 2 : 64;
        Entry **b = calloc(cap, sizeof *b);
        if (!b && !t->b) return NULL;
        for (size_t i = 0; b && t->b && i <= t->mask; i++)
            for (Entry *x = t->b[i], *next; x; x = next)
                next = x->next, x->next = b[x->hash & (cap - 1)], b[x->hash & (cap - 1)] = x;
        if (b) free(t->b), t->b = b, t->mask = cap - 1;
    }
    if (!(m = calloc(1, size + n + 1))) return NULL;
    e = (Entry *)m;
    memcpy(m + size, s, n);
    e->name = m + size, e->len = n, e->hash = str_hash(s, n);
    e->next = t->b[e->hash & t->mask], t->b[e->hash & t->mask] = e, t->count++;
    *created = 1;
    return e;
}

static void tb_remove(Table *t, Entry *e) {
    Entry **pp = &t->b[e->hash & t->mask];
    while (*pp != e) pp = &(*pp)->next;
    *pp = e->next, t->count--;
}

/* ---- the engine and its decision ------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Config cf;
    Str path, pool_attr, subset_attr; /* malloc'd copies */
    int notify_fd;
    /* the decision state, under mu */
    pthread_mutex_t mu;
    Table endpoints, pools;
    char **news; /* endpoints first named since new_endpoints(): length-prefixed copies */
    size_t nnews, cap_news;
    uint64_t buckets[NBUCKETS];
    double pick_sum;
    /* the HTTP thread: started and stopped with the GIL held */
    int served, running, wake[2], listen_fd;
    pthread_t thread;
    atomic_int stop;
} Engine;

static double fade_of(const Engine *en, const Endpoint *ep) {
    return ep->stay_s > 0 ? ep->stay_s : en->cf.default_fade;
}

/* Load.in_engine: as last read, and sent since, each fading with the stay there. */
static double in_engine(const Endpoint *ep, double now, double fade) {
    double read = ep->waiting + ep->running;
    if (read != 0) read *= exp((ep->read_at - now) / fade);
    return read + ep->sent * exp((ep->sent_at - now) / fade);
}

static void news_push(Engine *en, Str name) { /* under mu; out of memory it is not told */
    char *copy, **m;
    if (en->nnews == en->cap_news) {
        size_t cap = en->cap_news ? en->cap_news * 2 : 16;
        if (!(m = realloc(en->news, cap * sizeof *m))) return;
        en->news = m, en->cap_news = cap;
    }
    if (!(copy = malloc(sizeof(size_t) + name.n))) return;
    memcpy(copy, &name.n, sizeof(size_t)), memcpy(copy + sizeof(size_t), name.s, name.n);
    en->news[en->nnews++] = copy;
}

static void observe_locked(Engine *en, double seconds) { /* bisect_left, as metrics.py */
    int i = 0;
    while (i < NBUCKETS - 1 && BOUNDS[i] < seconds) i++;
    en->buckets[i]++, en->pick_sum += seconds;
}

typedef struct { Endpoint *ep; double queue, total; uint64_t rnd; size_t idx, matched; int up; } Rank;

static _Thread_local uint64_t rng; /* xorshift64, per thread: no lock, no shared state */

static uint64_t rand64(void) {
    if (!rng) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        rng = fmix64((uint64_t)t.tv_nsec ^ (uint64_t)t.tv_sec << 32 ^ (uintptr_t)&rng) | 1;
    }
    return rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
}

static int rank_cmp(const void *x, const void *y) { /* best first: up, total, then at random */
    const Rank *a = x, *b = y;
    if (a->up != b->up) return b->up - a->up;
    if (a->total != b->total) return a->total < b->total ? 1 : -1;
    if (a->rnd != b->rnd) return a->rnd < b->rnd ? 1 : -1;
    return a->idx < b->idx ? -1 : a->idx > b->idx;
}

/* The decision (Picker.decide and choose, scheduler.rank): 1 with *out the ranking joined
 * with ',' (in the arena), 0 without candidates, -1 out of memory. Takes the mutex. */
static int decide(Engine *en, Str pool, const Str *cand, size_t n, const uint8_t *body, size_t blen,
                  Arena *a, Str *out) {
    const Config *cf = &en->cf;
    uint64_t *hashes = NULL;
    size_t nh = 0, tokens = 0, i, len;
    Rank *r = NULL;
    int rc = 1, created = 0, fresh = 0;
    if (n && ((blen && blocks_of(cf, body, blen, a, &hashes, &nh, &tokens) < 0) ||
              !(r = arena_alloc(a, n * sizeof *r))))
        return -1;
    pthread_mutex_lock(&en->mu);
    Pool *pl = (Pool *)tb_get(&en->pools, pool.s, pool.n, sizeof(Pool), &fresh);
    if (!pl || !n) {
        if (pl) pl->picks[R_NONE]++;
        rc = pl ? 0 : -1;
        goto unlock;
    }
    double now = monotonic(), least = 0;
    for (i = 0; i < n; i++) { /* LoadWatcher.named, and the queues */
        fresh = 0;
        Endpoint *ep = (Endpoint *)tb_get(&en->endpoints, cand[i].s, cand[i].n, sizeof(Endpoint), &fresh);
        if (!ep) {
            rc = -1;
            goto unlock;
        }
        if (fresh) ep->up = 1, news_push(en, cand[i]), created = 1;
        ep->named_at = now;
        r[i].ep = ep, r[i].idx = i, r[i].queue = in_engine(ep, now, fade_of(en, ep));
        if (i == 0 || r[i].queue < least) least = r[i].queue;
    }
    for (i = 0; i < n; i++) { /* scheduler.rank's score, in its order of operations */
        Endpoint *ep = r[i].ep;
        r[i].matched = px_matched(&ep->prefix, hashes, nh);
        double prefix = nh ? (double)r[i].matched / (double)nh : 0.0;
        double queued = 1.0 - (r[i].queue - least) / cf->queue_unit;
        double used = ep->kv_cache + (double)ep->sent_tokens / cf->cache_tokens;
        double free_ = 1.0 - (used < 1.0 ? used : 1.0); /* Python's min(1.0, used) */
        double total = cf->w_prefix * prefix + cf->w_queue * queued + cf->w_kv * free_;
        r[i].total = isnan(total) ? -INFINITY : total; /* NaN would break qsort's order */
        r[i].up = ep->up != 0, r[i].rnd = rand64();
    }
    qsort(r, n, sizeof *r, rank_cmp);
    Endpoint *chosen = r[0].ep; /* Load.add_sent, PrefixIndex.record */
    chosen->sent = chosen->sent * exp((chosen->sent_at - now) / fade_of(en, chosen)) + 1.0;
    chosen->sent_at = now, chosen->sent_tokens += (long long)tokens;
    if (nh) px_record(&chosen->prefix, hashes, nh, cf->capacity_blocks);
    pl->picks[r[0].matched ? R_PREFIX : R_LOAD]++;
    if (nh) pl->prompt_blocks += nh, pl->matched_blocks += r[0].matched, pl->blocks_counted = 1;
unlock:
    pthread_mutex_unlock(&en->mu);
    if (created && en->notify_fd >= 0 && write(en->notify_fd, "+", 1) < 0) {} /* wake Python */
    if (rc != 1) return rc;
    for (i = 0, len = n - 1; i < n; i++) len += cand[i].n;
    char *s = arena_alloc(a, len + 1), *p = s;
    if (!s) return -1;
    for (i = 0; i < n; p += cand[r[i].idx].n, i++) {
        if (i) *p++ = ',';
        memcpy(p, cand[r[i].idx].s, cand[r[i].idx].n);
    }
    *out = (Str){s, len};
    return 1;
}

/* ---- the ext_proc answer (http_service.HttpService.answer) ---------------------------- */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static int8_t B64_VALUE[256]; /* filled once, at import */

static long b64_decode(const uint8_t *s, size_t n, uint8_t *o) { /* strict: '=' only to pad */
    size_t pad = n && s[n - 1] == '=' ? (n > 1 && s[n - 2] == '=' ? 2 : 1) : 0, k = 0;
    uint32_t acc = 0;
    if (n % 4) return -1;
    for (size_t i = 0; i < n - pad; i++) {
        if (B64_VALUE[s[i]] < 0) return -1;
        acc = acc << 6 | (uint32_t)B64_VALUE[s[i]];
        if (i % 4 == 3) o[k++] = (uint8_t)(acc >> 16), o[k++] = (uint8_t)(acc >> 8), o[k++] = (uint8_t)acc;
    }
    if (pad == 2) o[k++] = (uint8_t)(acc >> 4);
    if (pad == 1) o[k++] = (uint8_t)(acc >> 10), o[k++] = (uint8_t)(acc >> 2);
    return (long)k;
}

static size_t b64_encode(const uint8_t *s, size_t n, char *o) {
    size_t k = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (i + 1 < n ? (uint32_t)s[i + 1] << 8 : 0);
        v |= i + 2 < n ? s[i + 2] : 0;
        o[k++] = B64[v >> 18], o[k++] = B64[v >> 12 & 63];
        o[k++] = i + 1 < n ? B64[v >> 6 & 63] : '=', o[k++] = i + 2 < n ? B64[v & 63] : '=';
    }
    return k;
}

static size_t json_escape(const uint8_t *s, size_t n, char *o) { /* room: 6n */
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t c = s[i];
        if (c == '"' || c == '\\') {
            o[k++] = '\\', o[k++] = (char)c;
        } else if (c < 0x20) {
            k += (size_t)sprintf(o + k, "\\u%04x", c);
        } else if (c == 0xED && i + 2 < n && s[i + 1] >= 0xA0) { /* a lone surrogate: \udXXX */
            k += (size_t)sprintf(o + k, "\\u%04x", 0xD000u | (s[i + 1] & 63u) << 6 | (s[i + 2] & 63u));
            i += 2;
        } else {
            o[k++] = (char)c;
        }
    }
    return k;
}

static Str *split_commas(Str s, Arena *a, size_t *n) { /* the non-empty items */
    size_t items = 1, start = 0, i;
    for (i = 0; i < s.n; i++) items += s.s[i] == ',';
    Str *out = arena_alloc(a, items * sizeof *out);
    for (*n = 0, i = 0; out && i <= s.n; i++)
        if (i == s.n || s.s[i] == ',') {
            if (i > start) out[(*n)++] = (Str){s.s + start, i - start};
            start = i + 1;
        }
    return out;
}

static char *put(char *p, const char *s) { size_t n = strlen(s); return memcpy(p, s, n), p + n; }

/* The answer to one ProcessingRequest: 200 with *json, 400 not a ProcessingRequest, 500 out
 * of memory; *decided: whether it was a decision (only those are timed, as in Python). */
static int answer(Engine *en, const uint8_t *m, size_t len, Arena *a, Str *json, int *decided) {
    enum { K_BODY, K_HEADERS, K_CONFIG, K_ATTRS, K_META, NK };
    static const Str keys[NK] = {S("request_body"), S("request_headers"), S("protocol_config"),
                                 S("attributes"), S("metadata_context")};
    Span doc = parse_document(m, len), v[NK], k, val, kind = {NULL, NULL}, s, got[2] = {{0}};
    const uint8_t *body = NULL, *it;
    size_t blen = 0, n = 0, items = 0;
    const char *kname = "request_body";
    Str str, pool = STR(""), *cand = NULL, choice;
    long decoded;
    uint8_t *o;
    *decided = 0;
    if (!doc.s || *doc.s != '{') return 400;
    obj_get(doc, keys, NK, v);
    for (it = doc.s; !kind.s && obj_next(&it, doc.e, &k, &val);) /* the first request_/response_ */
        if (key_match(k, STR("request_"), 1) || key_match(k, STR("response_"), 1)) kind = k;
    if (v[K_BODY].s) {
        if (*v[K_BODY].s != '{') return 400; /* request_body.get: AttributeError */
        if ((s = obj_get1(v[K_BODY], "body")).s) {
            if (*s.s != '"') return 400;
            if (str_value(s, a, &str) || !(o = arena_alloc(a, str.n / 4 * 3 + 1))) return 500;
            if ((decoded = b64_decode((const uint8_t *)str.s, str.n, o)) < 0) return 400;
            body = o, blen = (size_t)decoded;
        }
    } else if (v[K_HEADERS].s && v[K_CONFIG].s && *v[K_CONFIG].s != '{') {
        return 400; /* protocol_config.get: AttributeError */
    } else if (v[K_HEADERS].s && (!(s = obj_get1(v[K_CONFIG], "request_body_mode")).s ||
                                  (*s.s == '"' && key_match((Span){s.s + 1, s.e - 1}, STR("NONE"), 0)))) {
        kname = "request_headers";
    } else { /* any other message: let through, as {"<kind>": {}} (the key as written: JSON) */
        size_t kn = kind.s ? (size_t)(kind.e - kind.s) : 12;
        char *p = arena_alloc(a, kn + 8);
        if (!p) return 500;
        memcpy(p, "{\"", 2), memcpy(p + 2, kind.s ? (const char *)kind.s : kname, kn);
        memcpy(p + 2 + kn, "\":{}}", 5);
        *json = (Str){p, kn + 7};
        return 200;
    }
    /* the version and its candidates: request attributes, else GIE's subset hint */
    if (v[K_ATTRS].s) {
        Span attrs = obj_get1(v[K_ATTRS], "envoy.filters.http.ext_proc");
        if (*v[K_ATTRS].s != '{' || (attrs.s && *attrs.s != '{')) return 400;
        obj_get(attrs, (Str[]){en->pool_attr, en->subset_attr}, 2, got);
    }
    if (got[0].s && *got[0].s == '"' && str_value(got[0], a, &pool)) return 500; /* else "" */
    if (got[1].s && truthy(got[1])) { /* `subset or ""`, then .split: a non-string fails */
        if (*got[1].s != '"') return 400;
        if (str_value(got[1], a, &str) || !(cand = split_commas(str, a, &n))) return 500;
    }
    if (!n && v[K_META].s) {
        Span fm = obj_get1(v[K_META], "filter_metadata");
        if (*v[K_META].s != '{' || (fm.s && *fm.s != '{')) return 400;
        s = obj_get1(obj_get1(fm, "envoy.lb.subset_hint"), "x-gateway-destination-endpoint-subset");
        if (s.s && *s.s == '"' && (str_value(s, a, &str) || !(cand = split_commas(str, a, &n)))) return 500;
        if (s.s && *s.s == '[') { /* its non-empty strings */
            for (it = s.s; arr_next(&it, s.e, &k);) items++;
            if (!(cand = arena_alloc(a, (items + 1) * sizeof *cand))) return 500;
            for (it = s.s; arr_next(&it, s.e, &k);)
                if (*k.s == '"' && k.e - k.s > 2 && str_value(k, a, &cand[n++])) return 500;
        }
    }
    int rc = decide(en, pool, cand, n, body, blen, a, &choice);
    if (rc < 0) return 500;
    *decided = 1;
    char *p = arena_alloc(a, 300 + (rc ? choice.n / 3 * 4 + 4 + 6 * choice.n : 0)), *start = p;
    if (!p) return 500;
    p = put(put(put(p, "{\""), kname), "\":");
    if (rc) {
        p = put(p, "{\"response\":{\"header_mutation\":{\"set_headers\":[{\"header\":"
                   "{\"key\":\"x-gateway-destination-endpoint\",\"raw_value\":\"");
        p += b64_encode((const uint8_t *)choice.s, choice.n, p);
        p = put(p, "\"}}]}}},\"dynamic_metadata\":{\"envoy.lb\":{\"x-gateway-destination-endpoint\":\"");
        p += json_escape((const uint8_t *)choice.s, choice.n, p);
        p = put(p, "\"}}}");
    } else {
        p = put(p, "{}}");
    }
    *json = (Str){start, (size_t)(p - start)};
    return 200;
}

/* ---- HTTP/1.1 (http1.py, http_service.Exchange) --------------------------------------- */

enum { F_HEAD, F_LENGTH, F_CHUNK_LINE, F_CHUNK_DATA, F_TRAILER };

typedef struct {
    int fd, closing; /* closing: a reply said connection: close; close once it is written */
    uint8_t *in, *out;
    size_t in_off, in_len, in_cap, out_off, out_len, out_cap;
    /* the request at in + in_off, framed as it arrives; offsets from its start */
    int phase, keep_alive;
    size_t scan; /* where to resume searching */
    size_t head_size, method_len, target_off, target_len;
    size_t length;                    /* content-length; chunked: the chunk's size */
    size_t pos;                       /* chunked: the size line, or the chunk's data */
    size_t body_len, total, line_end; /* chunked: data so far, moved down behind the head */
} Conn;

typedef struct { int status; const char *why; } Bad;

static int bad(Bad *b, int status, const char *why) { return b->status = status, b->why = why, -1; }

static int space(uint8_t c) { return c == ' ' || (c >= '\t' && c <= '\r'); } /* bytes.strip() */

static const uint8_t *strip(const uint8_t *s, const uint8_t **e) {
    while (s < *e && space(*s)) s++;
    while (*e > s && space((*e)[-1])) (*e)--;
    return s;
}

static int lower_eq(const uint8_t *s, const uint8_t *e, const char *lit) {
    size_t n = strlen(lit);
    if ((size_t)(e - s) != n) return 0;
    for (size_t i = 0; i < n; i++)
        if ((s[i] >= 'A' && s[i] <= 'Z' ? s[i] | 32 : s[i]) != lit[i]) return 0;
    return 1;
}

static int lower_has(const uint8_t *s, const uint8_t *e, const char *lit) { /* lit in value.lower() */
    for (size_t n = strlen(lit); (size_t)(e - s) >= n; s++)
        if (lower_eq(s, s + n, lit)) return 1;
    return 0;
}

/* http1.read_head on the head [r, r + len) (its blank line left out). */
static int parse_head(Conn *c, const uint8_t *r, size_t len, Bad *b) {
    const uint8_t *e = r + len, *line_end = memmem(r, len, "\r\n", 2), *sp1, *sp2 = NULL, *version;
    int chunked = 0, has_length = 0;
    if (!line_end) line_end = e;
    if ((sp1 = memchr(r, ' ', (size_t)(line_end - r)))) /* METHOD SP TARGET SP VERSION */
        sp2 = memchr(sp1 + 1, ' ', (size_t)(line_end - sp1 - 1));
    if (!sp2 || line_end - (version = sp2 + 1) != 8 ||
        (memcmp(version, "HTTP/1.1", 8) && memcmp(version, "HTTP/1.0", 8)))
        return bad(b, 400, "not HTTP/1.x");
    c->method_len = (size_t)(sp1 - r);
    c->target_off = (size_t)(sp1 + 1 - r), c->target_len = (size_t)(sp2 - sp1 - 1);
    c->keep_alive = version[7] == '1', c->length = 0;
    for (const uint8_t *p = line_end + 2, *end; p < e + 2; p = end + 2) { /* each header line */
        const uint8_t *colon, *ne, *ve, *name, *value;
        if (!(end = memmem(p, (size_t)(e - p), "\r\n", 2))) end = e;
        if (!(colon = memchr(p, ':', (size_t)(end - p)))) return bad(b, 400, "malformed header");
        ne = colon, ve = end, name = strip(p, &ne), value = strip(colon + 1, &ve);
        if (lower_eq(name, ne, "content-length")) {
            if (value == ve || has_length) return bad(b, 400, "bad content-length");
            for (const uint8_t *d = value; d < ve; d++) {
                if (*d < '0' || *d > '9') return bad(b, 400, "bad content-length");
                if (c->length <= MAX_MESSAGE) c->length = c->length * 10 + (size_t)(*d - '0'); /* saturates */
            }
            has_length = 1;
        } else if (lower_eq(name, ne, "transfer-encoding")) {
            if (!lower_eq(value, ve, "chunked")) return bad(b, 501, "only chunked transfer-encoding");
            chunked = 1;
        } else if (lower_eq(name, ne, "connection")) {
            if (lower_has(value, ve, "close")) c->keep_alive = 0;
            else if (lower_has(value, ve, "keep-alive")) c->keep_alive = 1;
        }
    }
    if (chunked && has_length) return bad(b, 400, "both content-length and chunked");
    c->head_size = len + 4;
    if (chunked) {
        c->phase = F_CHUNK_LINE, c->pos = c->scan = c->head_size, c->body_len = c->total = 0;
        return 0;
    }
    if (c->length > MAX_MESSAGE) return bad(b, 413, "message too large");
    return c->phase = F_LENGTH, 0;
}

/* http1.read_head + read_body, resumed where the last call stopped: 1 with the request
 * whole (*body, and *size: the bytes it takes), 0 for more, -1 with *b the error. Chunks'
 * data are moved down behind the head as they come, so a body is never copied twice. */
static int frame(Conn *c, const uint8_t **body, size_t *blen, size_t *size, Bad *b) {
    uint8_t *r = c->in + c->in_off;
    const uint8_t *found, *s, *e;
    size_t n = c->in_len - c->in_off;
    uint64_t chunk;
#define FIND(pat) (found = n > c->scan ? memmem(r + c->scan, n - c->scan, pat, sizeof pat - 1) : NULL)
    for (;;) {
        switch (c->phase) {
        case F_HEAD:
            if (FIND("\r\n\r\n")) {
                if (parse_head(c, r, (size_t)(found - r), b)) return -1;
                continue;
            }
            if (n > MAX_HEAD) return bad(b, 431, "head too large");
            c->scan = n >= 3 ? n - 3 : 0;
            return 0;
        case F_LENGTH:
            if (n < c->head_size + c->length) return 0;
            *body = r + c->head_size, *blen = c->length, *size = c->head_size + c->length;
            return 1;
        case F_CHUNK_LINE:
            if (!FIND("\r\n")) {
                if (n - c->pos > MAX_CHUNK_LINE) return bad(b, 400, "chunk size line too long");
                c->scan = n > c->pos + 1 ? n - 1 : c->pos;
                return 0;
            }
            s = r + c->pos;
            if (!(e = memchr(s, ';', (size_t)(found - s)))) e = found; /* extensions: ignored */
            s = strip(s, &e);
            if (s == e || e - s > 16) return bad(b, 400, "bad chunk size");
            for (chunk = 0; s < e; s++) {
                if (hexval(*s) < 0) return bad(b, 400, "bad chunk size");
                chunk = chunk << 4 | (uint64_t)hexval(*s);
            }
            if (chunk > MAX_MESSAGE - c->total) return bad(b, 413, "message too large");
            c->total += chunk, c->line_end = (size_t)(found - r);
            if (chunk == 0) c->phase = F_TRAILER, c->scan = c->line_end; /* then trailers, to a blank line */
            else c->phase = F_CHUNK_DATA, c->length = chunk, c->pos = c->line_end + 2;
            continue;
        case F_CHUNK_DATA:
            if (n < c->pos + c->length + 2) return 0;
            if (memcmp(r + c->pos + c->length, "\r\n", 2)) return bad(b, 400, "chunk not followed by CRLF");
            memmove(r + c->head_size + c->body_len, r + c->pos, c->length);
            c->body_len += c->length, c->pos = c->scan = c->pos + c->length + 2, c->phase = F_CHUNK_LINE;
            continue;
        case F_TRAILER:
            if (FIND("\r\n\r\n")) {
                *body = r + c->head_size, *blen = c->body_len, *size = (size_t)(found - r) + 4;
                return 1;
            }
            if (n - c->line_end > MAX_HEAD) return bad(b, 431, "trailers too large"); /* http1.py: no bound */
            c->scan = n >= c->line_end + 3 ? n - 3 : c->line_end;
            return 0;
        }
    }
#undef FIND
}

static int reserve(uint8_t **buf, size_t *cap, size_t need) {
    size_t n = *cap * 2 > need ? *cap * 2 : need;
    uint8_t *m;
    if (need <= *cap) return 0;
    if (!(m = realloc(*buf, n))) return -1;
    return *buf = m, *cap = n, 0;
}

static int flush(Conn *c) { /* -1: the connection is gone */
    while (c->out_off < c->out_len) {
        ssize_t k = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (k > 0) c->out_off += (size_t)k;
        else if (k < 0 && errno == EINTR) continue;
        else return k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
    }
    c->out_off = c->out_len = 0;
    if (c->out_cap > BIG_BUFFER) free(c->out), c->out = NULL, c->out_cap = 0;
    return 0;
}

static const char *reason(int status) {
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 413: return "Content Too Large";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    }
    return "Error";
}

static int reply(Conn *c, int status, const char *body, size_t n, int keep_alive, int json) {
    char head[200];
    size_t h = (size_t)snprintf(head, sizeof head,
                                "HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %zu\r\n%s\r\n", status,
                                reason(status), json ? "application/json" : "text/plain", n,
                                keep_alive ? "" : "connection: close\r\n");
    if (reserve(&c->out, &c->out_cap, c->out_len + h + n)) return -1;
    memcpy(c->out + c->out_len, head, h), memcpy(c->out + c->out_len + h, body, n);
    c->out_len += h + n, c->closing |= !keep_alive;
    return flush(c);
}

/* Answer the whole requests buffered, in turn, while the answers go out at once. */
static int process(Engine *en, Conn *c, Arena *a) {
    while (!c->closing && c->out_len == 0) {
        const uint8_t *body, *r = c->in + c->in_off, *target, *q;
        size_t blen, size, tlen;
        Bad b;
        Str json;
        int rc = frame(c, &body, &blen, &size, &b), keep = c->keep_alive, decided = 0, status;
        if (rc <= 0) return rc ? reply(c, b.status, b.why, strlen(b.why), 0, 0) : 0;
        double started = monotonic();
        target = r + c->target_off;
        tlen = (q = memchr(target, '?', c->target_len)) ? (size_t)(q - target) : c->target_len;
        if (c->method_len != 4 || memcmp(r, "POST", 4)) {
            rc = reply(c, 405, "POST only", 9, keep, 0);
        } else if (tlen != en->path.n || memcmp(target, en->path.s, tlen)) {
            rc = reply(c, 404, "not found", 9, keep, 0);
        } else {
            status = answer(en, body, blen, a, &json, &decided);
            if (decided) { /* pick_seconds: from the message whole to its answer */
                double took = monotonic() - started;
                pthread_mutex_lock(&en->mu), observe_locked(en, took), pthread_mutex_unlock(&en->mu);
            }
            if (status == 200) rc = reply(c, 200, json.s, json.n, keep, 1);
            else if (status == 400) rc = reply(c, 400, "not a ProcessingRequest", 23, keep, 0);
            else rc = reply(c, 500, "error", 5, keep, 0);
            arena_reset(a);
        }
        c->in_off += size, c->phase = F_HEAD, c->scan = 0; /* the next request */
        if (c->in_off == c->in_len) c->in_off = c->in_len = 0;
        if (rc < 0) return -1;
    }
    if (c->in_len == 0 && c->in_cap > BIG_BUFFER) free(c->in), c->in = NULL, c->in_cap = 0;
    return 0;
}

static int conn_read(Conn *c) { /* -1: closed, failed or out of memory */
    size_t need;
    if (c->in_off) { /* what is consumed goes: a request at the start again */
        memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
        c->in_len -= c->in_off, c->in_off = 0;
    }
    need = c->in_len + READ_SIZE;
    if (c->phase == F_LENGTH && c->head_size + c->length > need) /* the whole message at once */
        need = c->head_size + c->length;
    if (reserve(&c->in, &c->in_cap, need)) return -1;
    ssize_t k = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
    if (k > 0) c->in_len += (size_t)k;
    return k > 0 || (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) ? 0 : -1;
}

static void conn_close(Conn *c) {
    char sink[4096]; /* unread input would make close() reset and lose the last reply */
    for (int i = 0; i < 16 && recv(c->fd, sink, sizeof sink, 0) > 0; i++) {}
    close(c->fd), free(c->in), free(c->out), free(c);
}

static void accept_all(int listen_fd, Conn **conns, size_t *n, double *paused_until) {
    for (int fd, one = 1;;) {
        Conn *c;
        if ((fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) *paused_until = monotonic() + 0.1; /* no fds */
            return;
        }
        if (*n >= MAX_CONNS || !(c = calloc(1, sizeof *c))) { /* beyond the limit: closed */
            close(fd);
            continue;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->fd = fd, c->phase = F_HEAD, conns[(*n)++] = c;
    }
}

static void *serve_thread(void *arg) { /* never takes the GIL, calls no Python */
    Engine *en = arg;
    Conn **conns = calloc(MAX_CONNS, sizeof *conns);
    struct pollfd *fds = calloc(MAX_CONNS + 2, sizeof *fds);
    Arena arena = {NULL};
    size_t n = 0, i, kept, polled;
    int listen_fd = en->listen_fd, paused;
    double paused_until = 0;
    while (conns && fds && !atomic_load(&en->stop)) {
        paused = paused_until > 0 && monotonic() < paused_until;
        fds[0] = (struct pollfd){en->wake[0], POLLIN, 0};
        fds[1] = (struct pollfd){paused ? -1 : listen_fd, POLLIN, 0};
        for (i = 0; i < n; i++)
            fds[i + 2] = (struct pollfd){conns[i]->fd, conns[i]->out_len ? POLLOUT : POLLIN, 0};
        if (poll(fds, (polled = n) + 2, paused ? 100 : -1) < 0) {
            if (errno != EINTR) usleep(10000); /* ENOMEM: do not spin */
            continue;
        }
        if (fds[0].revents) { /* close(): the loop's test sees stop */
            char drain[64];
            while (read(en->wake[0], drain, sizeof drain) > 0) {}
            continue;
        }
        for (i = 0; i < polled; i++) {
            Conn *c = conns[i];
            short ev = fds[i + 2].revents;
            int dead;
            if (!ev) continue;
            if (ev & POLLNVAL) dead = 1;
            else if (c->out_len) /* a reply waited for room: write it, then go on */
                dead = flush(c) < 0 || (!c->out_len && (c->closing || process(en, c, &arena) < 0));
            else dead = conn_read(c) < 0 || process(en, c, &arena) < 0;
            if (dead || (c->closing && !c->out_len)) conn_close(c), conns[i] = NULL;
        }
        for (i = kept = 0; i < n; i++) /* the connections still open, in order */
            if (conns[i]) conns[kept++] = conns[i];
        n = kept;
        if (fds[1].revents & POLLNVAL) listen_fd = -1; /* Python closed it: serve who is connected */
        else if (fds[1].revents) accept_all(listen_fd, conns, &n, &paused_until);
    }
    for (i = 0; conns && i < n; i++) conn_close(conns[i]);
    free(conns), free(fds), arena_free(&arena);
    return NULL;
}

static void stop_serving(Engine *en) { /* with the GIL, released while joining */
    pthread_t t = en->thread;
    if (!en->running) return;
    en->running = 0;
    atomic_store(&en->stop, 1);
    if (write(en->wake[1], "x", 1) < 0) {} /* the pipe is empty: it cannot fail */
    Py_BEGIN_ALLOW_THREADS
    pthread_join(t, NULL);
    Py_END_ALLOW_THREADS
    close(en->wake[0]), close(en->wake[1]);
    en->wake[0] = en->wake[1] = -1;
}

/* ---- the Python type ------------------------------------------------------------------ */

static Str dup_str(const char *s, Py_ssize_t n) {
    char *m = malloc((size_t)n + 1);
    if (m) memcpy(m, s, (size_t)n), m[n] = 0;
    return (Str){m, (size_t)n};
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"block_chars", "max_blocks", "capacity_blocks", "cache_tokens", "w_prefix",
                         "w_queue", "w_kv", "queue_unit", "default_fade", "path", "pool_attribute",
                         "subset_attribute", "notify_fd", NULL};
    Py_ssize_t bc = 0, mb = 0, cb = 0, ct = 0, path_n = 0, pool_n = 0, subset_n = 0;
    double wp = 0, wq = 0, wk = 0, qu = 0, fade = 0;
    const char *path = NULL, *pool = NULL, *subset = NULL;
    int notify = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$nnnnddddds#s#s#i", kw, &bc, &mb, &cb, &ct, &wp, &wq, &wk,
                                     &qu, &fade, &path, &path_n, &pool, &pool_n, &subset, &subset_n, &notify))
        return NULL;
    if (!kwds || PyDict_GET_SIZE(kwds) != 13) {
        PyErr_SetString(PyExc_TypeError, "Engine() takes all of its 13 keyword arguments");
        return NULL;
    }
    if (bc < 1 || mb < 1 || cb < 1 || ct < 1 || mb > (1 << 30) || cb > (1 << 30) || !(qu > 0) ||
        !(fade > 0) || !isfinite(wp) || !isfinite(wq) || !isfinite(wk) || !isfinite(qu) || !isfinite(fade)) {
        PyErr_SetString(PyExc_ValueError, "Engine(): sizes must be >= 1, queue_unit and default_fade > 0");
        return NULL;
    }
    Engine *en = (Engine *)type->tp_alloc(type, 0);
    if (!en) return NULL;
    en->wake[0] = en->wake[1] = -1, en->notify_fd = notify;
    en->cf = (Config){(size_t)bc, (size_t)mb, (size_t)cb, (double)ct, wp, wq, wk, qu, fade};
    en->path = dup_str(path, path_n), en->pool_attr = dup_str(pool, pool_n);
    en->subset_attr = dup_str(subset, subset_n);
    if (pthread_mutex_init(&en->mu, NULL) || !en->path.s || !en->pool_attr.s || !en->subset_attr.s) {
        Py_DECREF(en);
        return PyErr_NoMemory();
    }
    return (PyObject *)en;
}

static void Engine_dealloc(Engine *en) {
    stop_serving(en);
    for (size_t i = 0; en->endpoints.b && i <= en->endpoints.mask; i++)
        for (Entry *e = en->endpoints.b[i], *next; e; e = next)
            next = e->next, px_clear(&((Endpoint *)e)->prefix), free(e);
    for (size_t i = 0; en->pools.b && i <= en->pools.mask; i++)
        for (Entry *e = en->pools.b[i], *next; e; e = next) next = e->next, free(e);
    for (size_t i = 0; i < en->nnews; i++) free(en->news[i]);
    free(en->news), free(en->endpoints.b), free(en->pools.b);
    free((char *)en->path.s), free((char *)en->pool_attr.s), free((char *)en->subset_attr.s);
    pthread_mutex_destroy(&en->mu); /* harmless on the zeroed mutex of a failed Engine() */
    Py_TYPE(en)->tp_free((PyObject *)en);
}

static PyObject *Engine_decide(Engine *en, PyObject *args) {
    PyObject *pool_obj, *cand_obj, *body_obj, *tuple, *result = NULL;
    Py_buffer body = {0};
    Py_ssize_t len;
    Arena a = {NULL};
    Str pool, choice, *cand = NULL;
    int has_body = 0, rc;
    size_t n;
    if (!PyArg_ParseTuple(args, "UOO:decide", &pool_obj, &cand_obj, &body_obj)) return NULL;
    if (!(pool.s = PyUnicode_AsUTF8AndSize(pool_obj, &len))) return NULL;
    pool.n = (size_t)len;
    if (!(tuple = PySequence_Tuple(cand_obj))) return NULL; /* it keeps the strings (and UTF-8) alive */
    if ((n = (size_t)PyTuple_GET_SIZE(tuple)) && !(cand = arena_alloc(&a, n * sizeof *cand))) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(tuple, i);
        if (!PyUnicode_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "decide(): candidates must be str");
            goto done;
        }
        if (!(cand[i].s = PyUnicode_AsUTF8AndSize(item, &len))) goto done;
        cand[i].n = (size_t)len;
    }
    if (body_obj != Py_None && !(has_body = PyObject_GetBuffer(body_obj, &body, PyBUF_SIMPLE) == 0))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    rc = decide(en, pool, cand, n, body.buf, has_body ? (size_t)body.len : 0, &a, &choice);
    Py_END_ALLOW_THREADS
    if (rc < 0) result = PyErr_NoMemory();
    else if (rc == 0) result = Py_NewRef(Py_None);
    else result = PyUnicode_DecodeUTF8(choice.s, (Py_ssize_t)choice.n, "surrogatepass");
done:
    if (has_body) PyBuffer_Release(&body);
    Py_DECREF(tuple);
    arena_free(&a);
    return result;
}

static PyObject *Engine_blocks(Engine *en, PyObject *args) {
    Py_buffer body;
    Arena a = {NULL};
    uint64_t *h = NULL;
    size_t n = 0, tokens = 0;
    int rc;
    if (!PyArg_ParseTuple(args, "y*:blocks", &body)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = body.len ? blocks_of(&en->cf, body.buf, (size_t)body.len, &a, &h, &n, &tokens) : 0;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&body);
    PyObject *list = rc < 0 ? PyErr_NoMemory() : PyList_New((Py_ssize_t)n), *item;
    for (size_t i = 0; list && i < n; i++)
        if ((item = PyLong_FromUnsignedLongLong(h[i]))) PyList_SET_ITEM(list, (Py_ssize_t)i, item);
        else Py_CLEAR(list);
    arena_free(&a);
    return list ? Py_BuildValue("(Nn)", list, (Py_ssize_t)tokens) : NULL;
}

static PyObject *Engine_serve(Engine *en, PyObject *args) {
    int fd, flags, err;
    sigset_t all, old;
    if (!PyArg_ParseTuple(args, "i:serve", &fd)) return NULL;
    if (en->served) {
        PyErr_SetString(PyExc_RuntimeError, "serve(): the engine serves already (or did)");
        return NULL;
    }
    if ((flags = fcntl(fd, F_GETFL)) < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0 ||
        pipe2(en->wake, O_NONBLOCK | O_CLOEXEC) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    en->listen_fd = fd;
    atomic_store(&en->stop, 0);
    sigfillset(&all); /* the thread takes no signal: they stay Python's */
    pthread_sigmask(SIG_BLOCK, &all, &old);
    err = pthread_create(&en->thread, NULL, serve_thread, en);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        close(en->wake[0]), close(en->wake[1]);
        en->wake[0] = en->wake[1] = -1, errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    en->served = en->running = 1;
    Py_RETURN_NONE;
}

static PyObject *Engine_close(Engine *en, PyObject *Py_UNUSED(ignored)) {
    stop_serving(en);
    Py_RETURN_NONE;
}

static PyObject *Engine_read(Engine *en, PyObject *args) {
    const char *name;
    Py_ssize_t n;
    int up;
    double waiting, running, kv, stay;
    if (!PyArg_ParseTuple(args, "s#pdddd:read", &name, &n, &up, &waiting, &running, &kv, &stay)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&en->mu);
    Endpoint *ep = (Endpoint *)tb_find(&en->endpoints, name, (size_t)n);
    if (ep && !up) { /* LoadWatcher._apply: a failed read only marks it down */
        ep->up = 0;
    } else if (ep) {
        ep->up = 1, ep->read_at = monotonic(), ep->sent = 0, ep->sent_tokens = 0;
        ep->waiting = waiting, ep->running = running, ep->kv_cache = kv, ep->stay_s = stay;
    }
    pthread_mutex_unlock(&en->mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *endpoint_op(Engine *en, PyObject *args, int op) { /* 0 forget, 1 drop, 2 named_at */
    const char *name;
    Py_ssize_t n;
    double named_at = 0;
    int found;
    if (!PyArg_ParseTuple(args, "s#", &name, &n)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&en->mu);
    Endpoint *ep = (Endpoint *)tb_find(&en->endpoints, name, (size_t)n);
    if ((found = ep != NULL)) {
        named_at = ep->named_at;
        if (op != 2) px_clear(&ep->prefix);
        if (op == 1) tb_remove(&en->endpoints, &ep->e), free(ep);
    }
    pthread_mutex_unlock(&en->mu);
    Py_END_ALLOW_THREADS
    if (op == 2 && found) return PyFloat_FromDouble(named_at);
    Py_RETURN_NONE;
}

static PyObject *Engine_forget(Engine *en, PyObject *args) { return endpoint_op(en, args, 0); }
static PyObject *Engine_drop(Engine *en, PyObject *args) { return endpoint_op(en, args, 1); }
static PyObject *Engine_named_at(Engine *en, PyObject *args) { return endpoint_op(en, args, 2); }

static PyObject *Engine_new_endpoints(Engine *en, PyObject *Py_UNUSED(ignored)) {
    char **news;
    size_t n, len;
    PyObject *list = PyList_New(0), *item;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&en->mu);
    news = en->news, n = en->nnews;
    en->news = NULL, en->nnews = en->cap_news = 0;
    pthread_mutex_unlock(&en->mu);
    Py_END_ALLOW_THREADS
    for (size_t i = 0; i < n; free(news[i]), i++) {
        memcpy(&len, news[i], sizeof len);
        item = list ? PyUnicode_DecodeUTF8(news[i] + sizeof len, (Py_ssize_t)len, "surrogatepass") : NULL;
        if (list && (!item || PyList_Append(list, item) < 0)) Py_CLEAR(list);
        Py_XDECREF(item);
    }
    free(news);
    return list;
}

static PyObject *Engine_observe(Engine *en, PyObject *args) {
    double s;
    if (!PyArg_ParseTuple(args, "d:observe", &s)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&en->mu), observe_locked(en, s), pthread_mutex_unlock(&en->mu);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static int set_count(PyObject *dict, PyObject *key, uint64_t count) {
    PyObject *v = PyLong_FromUnsignedLongLong(count);
    int ok = key && v && PyDict_SetItem(dict, key, v) == 0;
    Py_XDECREF(v);
    return ok;
}

static PyObject *Engine_stats(Engine *en, PyObject *Py_UNUSED(ignored)) {
    Pool *copy = NULL; /* the pools' counts; their names live as long as the engine */
    size_t n = 0;
    uint64_t buckets[NBUCKETS];
    double sum;
    int nomem = 0, ok;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&en->mu);
    nomem = en->pools.count && !(copy = malloc(en->pools.count * sizeof *copy));
    for (size_t i = 0; copy && i <= en->pools.mask; i++)
        for (Entry *e = en->pools.b[i]; e; e = e->next) copy[n++] = *(Pool *)e;
    memcpy(buckets, en->buckets, sizeof buckets), sum = en->pick_sum;
    pthread_mutex_unlock(&en->mu);
    Py_END_ALLOW_THREADS
    if (nomem) return PyErr_NoMemory();
    PyObject *picks = PyDict_New(), *prompt = PyDict_New(), *matched = PyDict_New();
    PyObject *bl = PyList_New(NBUCKETS), *result = NULL, *v, *name, *key;
    ok = picks && prompt && matched && bl;
    for (int i = 0; ok && i < NBUCKETS; i++)
        if ((ok = (v = PyLong_FromUnsignedLongLong(buckets[i])) != NULL)) PyList_SET_ITEM(bl, i, v);
    for (size_t i = 0; ok && i < n; i++) { /* as metrics.Decisions: only what was counted */
        name = PyUnicode_DecodeUTF8(copy[i].e.name, (Py_ssize_t)copy[i].e.len, "surrogatepass");
        ok = name != NULL;
        for (int r = 0; ok && r < 3; r++)
            if (copy[i].picks[r]) {
                ok = set_count(picks, key = Py_BuildValue("(Os)", name, REASONS[r]), copy[i].picks[r]);
                Py_XDECREF(key);
            }
        if (ok && copy[i].blocks_counted)
            ok = set_count(prompt, name, copy[i].prompt_blocks) &&
                 set_count(matched, name, copy[i].matched_blocks);
        Py_XDECREF(name);
    }
    if (ok)
        result = Py_BuildValue("{sOsOsOsOsd}", "picks", picks, "prompt_blocks", prompt, "matched_blocks",
                               matched, "pick_buckets", bl, "pick_sum", sum);
    Py_XDECREF(picks), Py_XDECREF(prompt), Py_XDECREF(matched), Py_XDECREF(bl);
    free(copy);
    return result;
}

static PyMethodDef Engine_methods[] = {
    {"decide", (PyCFunction)Engine_decide, METH_VARARGS, "decide(pool, candidates, body) -> str | None"},
    {"blocks", (PyCFunction)Engine_blocks, METH_VARARGS, "blocks(body) -> (hashes, tokens)"},
    {"serve", (PyCFunction)Engine_serve, METH_VARARGS, "serve(fd): answer ext_proc over HTTP on a thread"},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "close(): stop serving (idempotent)"},
    {"read", (PyCFunction)Engine_read, METH_VARARGS, "read(endpoint, up, waiting, running, kv, stay_s)"},
    {"forget", (PyCFunction)Engine_forget, METH_VARARGS, "forget(endpoint): its prefix index is empty"},
    {"drop", (PyCFunction)Engine_drop, METH_VARARGS, "drop(endpoint): no longer known"},
    {"named_at", (PyCFunction)Engine_named_at, METH_VARARGS, "named_at(endpoint) -> float | None"},
    {"new_endpoints", (PyCFunction)Engine_new_endpoints, METH_NOARGS, "endpoints first named since"},
    {"observe", (PyCFunction)Engine_observe, METH_VARARGS, "observe(seconds): one pick's time"},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "the decisions' counts"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "controlplane.picker._native.Engine",
    .tp_doc = "The endpoint picker's decision and its ext_proc HTTP transport, in C.",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "The endpoint picker's native engine.",
                                    -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m;
    memset(B64_VALUE, -1, sizeof B64_VALUE);
    for (int i = 0; i < 64; i++) B64_VALUE[(uint8_t)B64[i]] = (int8_t)i;
    if (getrandom(&HASH_SEED, sizeof HASH_SEED, 0) != sizeof HASH_SEED)
        HASH_SEED = fmix64((uint64_t)(monotonic() * 1e9) ^ (uint64_t)getpid());
    if (PyType_Ready(&EngineType) < 0 || !(m = PyModule_Create(&module))) return NULL;
    if (PyModule_AddType(m, &EngineType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
