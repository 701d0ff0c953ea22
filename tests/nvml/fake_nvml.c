/*
 * fake_nvml.c - a stand-in libnvidia-ml.so.1 for clawnode's tests.
 *
 * Loaded through nvml-wrapper 0.13 / nvml-wrapper-sys 0.10; types and enum values mirror
 * nvml-wrapper-sys/src/bindings.rs. Behaviour comes from the file named by FAKE_NVML_CONFIG,
 * re-read whenever it changes (see README.md next to this file).
 *
 * Build: gcc -O2 -Wall -Wextra -shared -fPIC -Wl,-soname,libnvidia-ml.so.1 \
 *            -o libnvidia-ml.so.1 fake_nvml.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>

/* ---- NVML types (layouts from bindings.rs) ---------------------------------------- */

typedef unsigned int nvmlReturn_t;
typedef struct nvmlDevice_st *nvmlDevice_t;
typedef struct nvmlEventSet_st *nvmlEventSet_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

_Static_assert(sizeof(nvmlPciInfo_t) == 68, "nvmlPciInfo_t layout");
_Static_assert(sizeof(nvmlMemory_v2_t) == 40, "nvmlMemory_v2_t layout");
_Static_assert(sizeof(nvmlEventData_t) == 32, "nvmlEventData_t layout");

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_MEMORY = 20,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
};

#define NVML_FEATURE_DISABLED 0u
#define NVML_FEATURE_ENABLED 1u
#define NVML_BRAND_NVIDIA 14u
#define NVML_TEMPERATURE_GPU 0u
#define NVML_CLOCK_GRAPHICS 0u
#define NVML_CLOCK_SM 1u
#define NVML_CLOCK_MEM 2u
#define NVML_CLOCK_VIDEO 3u
#define NVML_CLOCK_ID_COUNT 4u
#define NVML_MEMORY_ERROR_TYPE_CORRECTED 0u
#define NVML_MEMORY_ERROR_TYPE_UNCORRECTED 1u
#define NVML_VOLATILE_ECC 0u
#define NVML_AGGREGATE_ECC 1u
#define NVML_PAGE_RETIREMENT_CAUSE_COUNT 2u

#define EV_SINGLE_BIT_ECC 1ull
#define EV_DOUBLE_BIT_ECC 2ull
#define EV_PSTATE 4ull
#define EV_XID 8ull
#define SUPPORTED_EVENTS (EV_SINGLE_BIT_ECC | EV_DOUBLE_BIT_ECC | EV_PSTATE | EV_XID)
#define SUPPORTED_THROTTLE 0x1FFull /* GpuIdle .. DisplayClockSetting */

#define MEMORY_V2_VERSION ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

/* ---- simulated values ------------------------------------------------------------- */

#define MAX_GPUS 16
#define MAX_MIG 7
#define MAX_XID 4096
#define MAX_SETS 64
#define GIB (1024ull * 1024ull * 1024ull)
#define MIB (1024ull * 1024ull)

#define GPU_NAME "NVIDIA H100 80GB HBM3"
#define MEM_TOTAL 85520809984ull
#define MEM_RESERVED 536870912ull

/* Field names for `not_supported`, one bit each. */
static const char *const FIELD_NAMES[] = {
    "name",        "brand",       "serial",     "vbios",         "pci",
    "memory",      "compute_capability",        "persistence",   "power_limit",
    "ecc_mode",    "mig",         "utilization", "temperature",  "power",
    "energy",      "clocks",      "throttle",   "pcie",          "ecc_errors",
    "retired_pages", "remapped_rows", "events", "cuda",
};
enum {
    F_NAME, F_BRAND, F_SERIAL, F_VBIOS, F_PCI, F_MEMORY, F_CC, F_PERSISTENCE, F_POWER_LIMIT,
    F_ECC_MODE, F_MIG, F_UTILIZATION, F_TEMPERATURE, F_POWER, F_ENERGY, F_CLOCKS, F_THROTTLE,
    F_PCIE, F_ECC_ERRORS, F_RETIRED, F_REMAPPED, F_EVENTS, F_CUDA, F_COUNT,
    F_NONE = -1,
};
_Static_assert(sizeof(FIELD_NAMES) / sizeof(FIELD_NAMES[0]) == F_COUNT, "field table");

struct xid_line {
    unsigned int gpu;
    unsigned long long code;
};

struct config {
    nvmlReturn_t init_rc;
    unsigned int gpus;
    char driver[64];
    int cuda;
    unsigned int not_supported; /* bit per F_* */
    unsigned int lost;          /* bit per GPU index */
    int mig_enabled[MAX_GPUS];
    unsigned int mig_count[MAX_GPUS];
    char mig_profile[MAX_GPUS][MAX_MIG][32];
    unsigned int mig_gib[MAX_GPUS][MAX_MIG];
    unsigned int nxid;
    struct xid_line xid[MAX_XID];
};

/* Handles are addresses in these arrays; their contents are never read. */
struct nvmlDevice_st {
    char unused;
};
static struct nvmlDevice_st g_phys[MAX_GPUS];
static struct nvmlDevice_st g_mig[MAX_GPUS][MAX_MIG];

struct nvmlEventSet_st {
    int used;
    unsigned long long mask[MAX_GPUS]; /* registered event types per GPU */
};
static struct nvmlEventSet_st g_sets[MAX_SETS];

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned int g_refs;               /* successful inits minus shutdowns */
static struct config g_cfg, g_tmp;
static int g_cfg_loaded;                  /* g_cfg holds something (defaults at least) */
static unsigned char g_xid_done[MAX_XID]; /* by xid line ordinal, for the whole process */

/* Change detection for the config file. */
static struct {
    int valid;
    char path[4096];
    int missing;
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtim;
    int racy; /* modified very recently: re-read next time, mtime may not move again */
    unsigned long long hash;
} g_sig;

/* ---- config parsing --------------------------------------------------------------- */

static void defaults(struct config *c)
{
    memset(c, 0, sizeof(*c));
    c->init_rc = NVML_SUCCESS;
    c->gpus = 1;
    snprintf(c->driver, sizeof(c->driver), "%s", "580.95.05");
    c->cuda = 13000;
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t' || *s == '\r')
        s++;
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r'))
        s[--n] = '\0';
    return s;
}

static int parse_uint(const char *s, unsigned long long max, unsigned long long *out)
{
    char *end;
    if (*s == '\0' || *s == '-')
        return 0;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || *trim(end) != '\0' || v > max)
        return 0;
    *out = v;
    return 1;
}

static void warn(const char *path, unsigned int line, const char *what, const char *text)
{
    fprintf(stderr, "fake_nvml: %s:%u: %s: %s\n", path, line, what, text);
}

/* "<n>g.<m>gb" optionally followed by "+suffix"; returns m (GiB) or 0. */
static unsigned int profile_gib(const char *p)
{
    unsigned int n, m;
    int used = 0;
    if (sscanf(p, "%ug.%ugb%n", &n, &m, &used) != 2 || used == 0 || n == 0 || m == 0)
        return 0;
    if (p[used] != '\0' && p[used] != '+')
        return 0;
    return m;
}

static void parse_line(struct config *c, const char *path, unsigned int ln, char *line)
{
    char *hash = strchr(line, '#');
    if (hash)
        *hash = '\0';
    char *s = trim(line);
    if (*s == '\0')
        return;
    char *eq = strchr(s, '=');
    if (!eq) {
        warn(path, ln, "expected key = value", s);
        return;
    }
    *eq = '\0';
    char *key = trim(s), *val = trim(eq + 1);
    unsigned long long v;

    if (strcmp(key, "init") == 0) {
        if (strcmp(val, "ok") == 0)
            c->init_rc = NVML_SUCCESS;
        else if (strcmp(val, "driver_not_loaded") == 0)
            c->init_rc = NVML_ERROR_DRIVER_NOT_LOADED;
        else if (strcmp(val, "no_permission") == 0)
            c->init_rc = NVML_ERROR_NO_PERMISSION;
        else
            warn(path, ln, "init must be ok, driver_not_loaded or no_permission", val);
    } else if (strcmp(key, "gpus") == 0) {
        if (parse_uint(val, MAX_GPUS, &v))
            c->gpus = (unsigned int)v;
        else
            warn(path, ln, "gpus must be 0..16", val);
    } else if (strcmp(key, "driver") == 0) {
        if (*val != '\0' && strlen(val) < sizeof(c->driver))
            snprintf(c->driver, sizeof(c->driver), "%s", val);
        else
            warn(path, ln, "bad driver version", val);
    } else if (strcmp(key, "cuda") == 0) {
        if (parse_uint(val, 999999, &v))
            c->cuda = (int)v;
        else
            warn(path, ln, "cuda must be an integer like 12040", val);
    } else if (strcmp(key, "not_supported") == 0) {
        for (char *tok = strtok(val, ","); tok; tok = strtok(NULL, ",")) {
            char *name = trim(tok);
            int f;
            if (*name == '\0')
                continue;
            for (f = 0; f < F_COUNT && strcmp(FIELD_NAMES[f], name) != 0; f++)
                ;
            if (f < F_COUNT)
                c->not_supported |= 1u << f;
            else
                warn(path, ln, "unknown not_supported field", name);
        }
    } else if (strcmp(key, "lost") == 0) {
        for (char *tok = strtok(val, ","); tok; tok = strtok(NULL, ",")) {
            char *idx = trim(tok);
            if (*idx == '\0')
                continue;
            if (parse_uint(idx, MAX_GPUS - 1, &v))
                c->lost |= 1u << v;
            else
                warn(path, ln, "lost index must be 0..15", idx);
        }
    } else if (strcmp(key, "mig") == 0) {
        char *colon = strchr(val, ':');
        if (!colon) {
            warn(path, ln, "mig must be <gpu>:<profile>,...", val);
            return;
        }
        *colon = '\0';
        if (!parse_uint(trim(val), MAX_GPUS - 1, &v)) {
            warn(path, ln, "mig gpu index must be 0..15", val);
            return;
        }
        unsigned int g = (unsigned int)v, n = 0;
        c->mig_enabled[g] = 1;
        for (char *tok = strtok(colon + 1, ","); tok; tok = strtok(NULL, ",")) {
            char *p = trim(tok);
            unsigned int gib;
            if (*p == '\0')
                continue;
            if (n == MAX_MIG) {
                warn(path, ln, "more than 7 MIG devices, ignoring", p);
                break;
            }
            if ((gib = profile_gib(p)) == 0 || strlen(p) >= sizeof(c->mig_profile[g][n])) {
                warn(path, ln, "MIG profile must look like 1g.10gb", p);
                continue;
            }
            snprintf(c->mig_profile[g][n], sizeof(c->mig_profile[g][n]), "%s", p);
            c->mig_gib[g][n] = gib;
            n++;
        }
        c->mig_count[g] = n;
    } else if (strcmp(key, "xid") == 0) {
        char *colon = strchr(val, ':');
        unsigned long long code;
        if (!colon) {
            warn(path, ln, "xid must be <gpu>:<code>", val);
            return;
        }
        *colon = '\0';
        if (!parse_uint(trim(val), MAX_GPUS - 1, &v) ||
            !parse_uint(trim(colon + 1), ~0ull, &code)) {
            warn(path, ln, "xid must be <gpu 0..15>:<code>", val);
            return;
        }
        if (c->nxid == MAX_XID) {
            warn(path, ln, "too many xid lines, ignoring", val);
            return;
        }
        c->xid[c->nxid].gpu = (unsigned int)v;
        c->xid[c->nxid].code = code;
        c->nxid++;
    } else {
        warn(path, ln, "unknown key", key);
    }
}

static void parse(struct config *c, const char *path, char *text)
{
    unsigned int ln = 0;
    defaults(c);
    for (char *line = text; line;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        parse_line(c, path, ++ln, line);
        line = nl ? nl + 1 : NULL;
    }
}

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (n < cap)
            break;
        char *bigger = realloc(buf, cap * 2 + 1);
        if (!bigger) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = bigger;
        cap *= 2;
    }
    fclose(f);
    if (buf) {
        buf[n] = '\0';
        *len = n;
    }
    return buf;
}

static unsigned long long fnv1a(const char *s, size_t n)
{
    unsigned long long h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* Called with g_lock held, at the start of every NVML call. */
static void refresh(void)
{
    const char *path = getenv("FAKE_NVML_CONFIG");
    struct stat st;

    if (!path || *path == '\0') {
        if (!g_cfg_loaded || g_sig.valid) {
            defaults(&g_cfg);
            g_cfg_loaded = 1;
            g_sig.valid = 0;
        }
        return;
    }
    int same_path = g_sig.valid && strcmp(g_sig.path, path) == 0;
    if (stat(path, &st) != 0) {
        if (!same_path || !g_sig.missing) {
            fprintf(stderr, "fake_nvml: cannot stat %s (%s); using defaults\n", path,
                    strerror(errno));
            defaults(&g_cfg);
            g_cfg_loaded = 1;
            memset(&g_sig, 0, sizeof(g_sig));
            g_sig.valid = 1;
            g_sig.missing = 1;
            snprintf(g_sig.path, sizeof(g_sig.path), "%s", path);
        }
        return;
    }
    if (same_path && !g_sig.missing && !g_sig.racy && g_sig.dev == st.st_dev &&
        g_sig.ino == st.st_ino && g_sig.size == st.st_size &&
        g_sig.mtim.tv_sec == st.st_mtim.tv_sec && g_sig.mtim.tv_nsec == st.st_mtim.tv_nsec)
        return;

    size_t len = 0;
    char *text = slurp(path, &len);
    if (!text) {
        fprintf(stderr, "fake_nvml: cannot read %s; keeping the previous config\n", path);
        return;
    }
    unsigned long long h = fnv1a(text, len);
    if (!(same_path && !g_sig.missing && g_sig.hash == h && g_cfg_loaded)) {
        parse(&g_tmp, path, text);
        memcpy(&g_cfg, &g_tmp, sizeof(g_cfg));
        g_cfg_loaded = 1;
    }
    free(text);

    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    long long age_ms = (long long)(now.tv_sec - st.st_mtim.tv_sec) * 1000 +
                       (now.tv_nsec - st.st_mtim.tv_nsec) / 1000000;
    g_sig.valid = 1;
    g_sig.missing = 0;
    snprintf(g_sig.path, sizeof(g_sig.path), "%s", path);
    g_sig.dev = st.st_dev;
    g_sig.ino = st.st_ino;
    g_sig.size = st.st_size;
    g_sig.mtim = st.st_mtim;
    g_sig.racy = age_ms < 100;
    g_sig.hash = h;
}

/* ---- call prologue / epilogue ----------------------------------------------------- */

struct ref {
    unsigned int gpu; /* physical GPU index (the parent for MIG handles) */
    int mig;
    unsigned int k; /* MIG device index */
};

static nvmlReturn_t enter(void)
{
    pthread_mutex_lock(&g_lock);
    refresh();
    return g_refs ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
}

static nvmlReturn_t leave(nvmlReturn_t rc)
{
    pthread_mutex_unlock(&g_lock);
    return rc;
}

static int resolve(nvmlDevice_t d, struct ref *r)
{
    uintptr_t p = (uintptr_t)d, b = (uintptr_t)g_phys, m = (uintptr_t)g_mig;
    size_t sz = sizeof(struct nvmlDevice_st);
    if (p >= b && p < b + sizeof(g_phys) && (p - b) % sz == 0) {
        r->gpu = (unsigned int)((p - b) / sz);
        r->mig = 0;
        r->k = 0;
        return r->gpu < g_cfg.gpus;
    }
    if (p >= m && p < m + sizeof(g_mig) && (p - m) % sz == 0) {
        size_t q = (p - m) / sz;
        r->gpu = (unsigned int)(q / MAX_MIG);
        r->mig = 1;
        r->k = (unsigned int)(q % MAX_MIG);
        return r->gpu < g_cfg.gpus && g_cfg.mig_enabled[r->gpu] &&
               r->k < g_cfg.mig_count[r->gpu];
    }
    return 0;
}

/*
 * Prologue of every per-device call; on success the caller fills its outputs. Always
 * finish with leave(). Order: uninitialised, bad handle/arguments, lost GPU, MIG handle
 * where only physical GPUs answer, field listed in not_supported.
 */
static nvmlReturn_t enter_dev(nvmlDevice_t d, int field, int args_ok, int allow_mig,
                              struct ref *r)
{
    nvmlReturn_t rc = enter();
    if (rc != NVML_SUCCESS)
        return rc;
    if (!resolve(d, r) || !args_ok)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (g_cfg.lost & (1u << r->gpu))
        return NVML_ERROR_GPU_IS_LOST;
    if (r->mig && !allow_mig)
        return NVML_ERROR_NOT_SUPPORTED;
    if (field != F_NONE && (g_cfg.not_supported & (1u << field)))
        return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

static nvmlReturn_t put_str(char *buf, unsigned int len, const char *s)
{
    size_t need = strlen(s) + 1;
    if (len < need)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buf, s, need);
    return NVML_SUCCESS;
}

/* ---- per-GPU values --------------------------------------------------------------- */

static void gpu_uuid(unsigned int i, char *out, size_t n)
{
    snprintf(out, n, "GPU-00000000-0000-0000-0000-%012x", i);
}

static void mig_uuid(unsigned int i, unsigned int k, char *out, size_t n)
{
    snprintf(out, n, "MIG-%08x-0000-0000-0000-%012x", i, k);
}

static void gpu_serial(unsigned int i, char *out, size_t n)
{
    snprintf(out, n, "165412300000%u", i);
}

static void gpu_pci(unsigned int i, nvmlPciInfo_t *p)
{
    memset(p, 0, sizeof(*p));
    p->domain = 0;
    p->bus = 0x18 + i;
    p->device = 0;
    p->pciDeviceId = 0x233010DEu;    /* device 0x2330 (H100 SXM5 80GB), vendor 0x10de */
    p->pciSubSystemId = 0x16C110DEu;
    snprintf(p->busIdLegacy, sizeof(p->busIdLegacy), "%04X:%02X:%02X.0", p->domain, p->bus,
             p->device);
    snprintf(p->busId, sizeof(p->busId), "%08X:%02X:%02X.0", p->domain, p->bus, p->device);
}

struct mem {
    unsigned long long total, reserved, free, used;
};

static struct mem mem_of(const struct ref *r)
{
    struct mem m;
    if (r->mig) {
        m.total = (unsigned long long)g_cfg.mig_gib[r->gpu][r->k] * GIB;
        m.reserved = 0;
        m.used = (r->k + 1ull) * 16ull * MIB;
    } else {
        m.total = MEM_TOTAL;
        m.reserved = MEM_RESERVED;
        m.used = (r->gpu + 1ull) * GIB;
    }
    m.free = m.total - m.reserved - m.used;
    return m;
}

/* ---- init / system ---------------------------------------------------------------- */

static nvmlReturn_t do_init(void)
{
    pthread_mutex_lock(&g_lock);
    refresh();
    nvmlReturn_t rc = g_cfg.init_rc;
    if (rc == NVML_SUCCESS)
        g_refs++;
    return leave(rc);
}

nvmlReturn_t nvmlInit_v2(void) { return do_init(); }
nvmlReturn_t nvmlInit(void) { return do_init(); }
nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    return do_init();
}

nvmlReturn_t nvmlShutdown(void)
{
    nvmlReturn_t rc = enter();
    if (rc == NVML_SUCCESS)
        g_refs--;
    return leave(rc);
}

const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 11: return "Interrupt request issue";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM";
    case 15: return "GPU is lost";
    case 16: return "GPU requires restart";
    case 17: return "The operating system has blocked the request";
    case 18: return "RM has detected an NVML/RM version mismatch";
    case 19: return "In use by another client";
    case 20: return "Insufficient Memory";
    case 21: return "No data";
    case 22: return "The requested vgpu operation is not available on target device, because ECC is enabled";
    case 23: return "Ran out of critical resources, other than memory";
    case 24: return "Ran out of critical resources, other than memory";
    case 25: return "Argument version mismatch";
    case 26: return "Deprecated";
    case 27: return "Not Ready";
    case 28: return "GPU not found";
    case 29: return "Invalid state";
    case 30: return "Reset type not supported";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    nvmlReturn_t rc = enter();
    if (rc == NVML_SUCCESS)
        rc = version ? put_str(version, length, g_cfg.driver) : NVML_ERROR_INVALID_ARGUMENT;
    return leave(rc);
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    nvmlReturn_t rc = enter();
    if (rc == NVML_SUCCESS) {
        char buf[96];
        snprintf(buf, sizeof(buf), "%d.%s", g_cfg.cuda / 1000, g_cfg.driver);
        rc = version ? put_str(version, length, buf) : NVML_ERROR_INVALID_ARGUMENT;
    }
    return leave(rc);
}

static nvmlReturn_t cuda_version(int *v)
{
    nvmlReturn_t rc = enter();
    if (rc == NVML_SUCCESS && !v)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    else if (rc == NVML_SUCCESS && (g_cfg.not_supported & (1u << F_CUDA)))
        rc = NVML_ERROR_NOT_SUPPORTED;
    else if (rc == NVML_SUCCESS)
        *v = g_cfg.cuda;
    return leave(rc);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *cudaDriverVersion)
{
    return cuda_version(cudaDriverVersion);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *cudaDriverVersion)
{
    return cuda_version(cudaDriverVersion);
}

/* ---- device enumeration ----------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    nvmlReturn_t rc = enter();
    if (rc == NVML_SUCCESS) {
        if (deviceCount)
            *deviceCount = g_cfg.gpus;
        else
            rc = NVML_ERROR_INVALID_ARGUMENT;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount)
{
    return nvmlDeviceGetCount_v2(deviceCount);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t rc = enter();
    if (rc == NVML_SUCCESS) {
        if (device && index < g_cfg.gpus)
            *device = &g_phys[index];
        else
            rc = NVML_ERROR_INVALID_ARGUMENT;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    nvmlReturn_t rc = enter();
    if (rc != NVML_SUCCESS)
        return leave(rc);
    if (!uuid || !device)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    char buf[96];
    for (unsigned int i = 0; i < g_cfg.gpus; i++) {
        gpu_uuid(i, buf, sizeof(buf));
        if (strcmp(buf, uuid) == 0) {
            *device = &g_phys[i];
            return leave(NVML_SUCCESS);
        }
        for (unsigned int k = 0; g_cfg.mig_enabled[i] && k < g_cfg.mig_count[i]; k++) {
            mig_uuid(i, k, buf, sizeof(buf));
            if (strcmp(buf, uuid) == 0) {
                *device = &g_mig[i][k];
                return leave(NVML_SUCCESS);
            }
        }
    }
    return leave(NVML_ERROR_NOT_FOUND);
}

nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pciBusId, nvmlDevice_t *device)
{
    nvmlReturn_t rc = enter();
    if (rc != NVML_SUCCESS)
        return leave(rc);
    if (!pciBusId || !device)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    nvmlPciInfo_t p;
    for (unsigned int i = 0; i < g_cfg.gpus; i++) {
        gpu_pci(i, &p);
        if (strcasecmp(p.busId, pciBusId) == 0 || strcasecmp(p.busIdLegacy, pciBusId) == 0) {
            *device = &g_phys[i];
            return leave(NVML_SUCCESS);
        }
    }
    return leave(NVML_ERROR_NOT_FOUND);
}

nvmlReturn_t nvmlDeviceGetHandleByPciBusId(const char *pciBusId, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByPciBusId_v2(pciBusId, device);
}

nvmlReturn_t nvmlDeviceGetHandleBySerial(const char *serial, nvmlDevice_t *device)
{
    nvmlReturn_t rc = enter();
    if (rc != NVML_SUCCESS)
        return leave(rc);
    if (!serial || !device)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    char buf[32];
    for (unsigned int i = 0; i < g_cfg.gpus; i++) {
        gpu_serial(i, buf, sizeof(buf));
        if (strcmp(buf, serial) == 0) {
            *device = &g_phys[i];
            return leave(NVML_SUCCESS);
        }
    }
    return leave(NVML_ERROR_NOT_FOUND);
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_NONE, index != NULL, 0, &r);
    if (rc == NVML_SUCCESS)
        *index = r.gpu;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minorNumber)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_NONE, minorNumber != NULL, 0, &r);
    if (rc == NVML_SUCCESS)
        *minorNumber = r.gpu;
    return leave(rc);
}

/* ---- identity ----------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_NAME, name != NULL, 1, &r);
    if (rc == NVML_SUCCESS) {
        char buf[96];
        if (r.mig)
            snprintf(buf, sizeof(buf), "%s MIG %s", GPU_NAME, g_cfg.mig_profile[r.gpu][r.k]);
        else
            snprintf(buf, sizeof(buf), "%s", GPU_NAME);
        rc = put_str(name, length, buf);
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_NONE, uuid != NULL, 1, &r);
    if (rc == NVML_SUCCESS) {
        char buf[96];
        if (r.mig)
            mig_uuid(r.gpu, r.k, buf, sizeof(buf));
        else
            gpu_uuid(r.gpu, buf, sizeof(buf));
        rc = put_str(uuid, length, buf);
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetBrand(nvmlDevice_t device, unsigned int *type)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_BRAND, type != NULL, 0, &r);
    if (rc == NVML_SUCCESS)
        *type = NVML_BRAND_NVIDIA;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetSerial(nvmlDevice_t device, char *serial, unsigned int length)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_SERIAL, serial != NULL, 0, &r);
    if (rc == NVML_SUCCESS) {
        char buf[32];
        gpu_serial(r.gpu, buf, sizeof(buf));
        rc = put_str(serial, length, buf);
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetVbiosVersion(nvmlDevice_t device, char *version, unsigned int length)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_VBIOS, version != NULL, 0, &r);
    if (rc == NVML_SUCCESS) {
        char buf[32];
        snprintf(buf, sizeof(buf), "96.00.99.00.%02u", r.gpu);
        rc = put_str(version, length, buf);
    }
    return leave(rc);
}

static nvmlReturn_t pci_info(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_PCI, pci != NULL, 0, &r);
    if (rc == NVML_SUCCESS)
        gpu_pci(r.gpu, pci);
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    return pci_info(device, pci);
}
nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    return pci_info(device, pci);
}
nvmlReturn_t nvmlDeviceGetPciInfo(nvmlDevice_t device, nvmlPciInfo_t *pci)
{
    return pci_info(device, pci);
}

nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major, int *minor)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_CC, major && minor, 0, &r);
    if (rc == NVML_SUCCESS) {
        *major = 9;
        *minor = 0;
    }
    return leave(rc);
}

/* ---- memory ----------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_MEMORY, memory != NULL, 1, &r);
    if (rc == NVML_SUCCESS && memory->version != MEMORY_V2_VERSION)
        rc = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (rc == NVML_SUCCESS) {
        struct mem m = mem_of(&r);
        memory->total = m.total;
        memory->reserved = m.reserved;
        memory->free = m.free;
        memory->used = m.used;
    }
    return leave(rc);
}

/* v1 counts reserved memory as used, as the real v1 call does. */
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_MEMORY, memory != NULL, 1, &r);
    if (rc == NVML_SUCCESS) {
        struct mem m = mem_of(&r);
        memory->total = m.total;
        memory->used = m.used + m.reserved;
        memory->free = m.free;
    }
    return leave(rc);
}

/* ---- modes and limits ------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetPersistenceMode(nvmlDevice_t device, unsigned int *mode)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_PERSISTENCE, mode != NULL, 0, &r);
    if (rc == NVML_SUCCESS)
        *mode = NVML_FEATURE_ENABLED;
    return leave(rc);
}

static nvmlReturn_t power_limit(nvmlDevice_t device, unsigned int *limit)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_POWER_LIMIT, limit != NULL, 0, &r);
    if (rc == NVML_SUCCESS)
        *limit = 700000;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit)
{
    return power_limit(device, limit);
}
nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit)
{
    return power_limit(device, limit);
}
nvmlReturn_t nvmlDeviceGetPowerManagementDefaultLimit(nvmlDevice_t device,
                                                      unsigned int *defaultLimit)
{
    return power_limit(device, defaultLimit);
}

nvmlReturn_t nvmlDeviceGetEccMode(nvmlDevice_t device, unsigned int *current,
                                  unsigned int *pending)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_ECC_MODE, current && pending, 0, &r);
    if (rc == NVML_SUCCESS) {
        *current = NVML_FEATURE_ENABLED;
        *pending = NVML_FEATURE_ENABLED;
    }
    return leave(rc);
}

/* ---- MIG ---------------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode,
                                  unsigned int *pendingMode)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_MIG, currentMode && pendingMode, 0, &r);
    if (rc == NVML_SUCCESS) {
        *currentMode = g_cfg.mig_enabled[r.gpu] ? 1 : 0;
        *pendingMode = *currentMode;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_MIG, count != NULL, 0, &r);
    if (rc == NVML_SUCCESS)
        *count = MAX_MIG; /* an H100 is MIG-capable whether or not MIG is on */
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index,
                                                 nvmlDevice_t *migDevice)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_MIG, migDevice != NULL, 0, &r);
    if (rc == NVML_SUCCESS) {
        if (g_cfg.mig_enabled[r.gpu] && index < g_cfg.mig_count[r.gpu])
            *migDevice = &g_mig[r.gpu][index];
        else
            rc = NVML_ERROR_NOT_FOUND;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMigDevice)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_NONE, isMigDevice != NULL, 1, &r);
    if (rc == NVML_SUCCESS)
        *isMigDevice = r.mig ? 1 : 0;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t migDevice,
                                                          nvmlDevice_t *device)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(migDevice, F_NONE, device != NULL, 1, &r);
    if (rc == NVML_SUCCESS) {
        if (r.mig)
            *device = &g_phys[r.gpu];
        else
            rc = NVML_ERROR_INVALID_ARGUMENT;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_MIG, id != NULL, 1, &r);
    if (rc == NVML_SUCCESS) {
        if (r.mig)
            *id = r.k + 1;
        else
            rc = NVML_ERROR_NOT_SUPPORTED;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_MIG, id != NULL, 1, &r);
    if (rc == NVML_SUCCESS) {
        if (r.mig)
            *id = 0;
        else
            rc = NVML_ERROR_NOT_SUPPORTED;
    }
    return leave(rc);
}

/* ---- telemetry ---------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_UTILIZATION, utilization != NULL, 0, &r);
    if (rc == NVML_SUCCESS) {
        utilization->gpu = (10 * r.gpu) % 100;
        utilization->memory = 5 * r.gpu;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, unsigned int sensorType,
                                      unsigned int *temp)
{
    struct ref r;
    nvmlReturn_t rc =
        enter_dev(device, F_TEMPERATURE, temp && sensorType == NVML_TEMPERATURE_GPU, 0, &r);
    if (rc == NVML_SUCCESS)
        *temp = 30 + r.gpu;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_POWER, power != NULL, 0, &r);
    if (rc == NVML_SUCCESS)
        *power = 100000 + r.gpu * 1000;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_ENERGY, energy != NULL, 0, &r);
    if (rc == NVML_SUCCESS)
        *energy = 1000000ull + r.gpu;
    return leave(rc);
}

static unsigned int clock_mhz(unsigned int type)
{
    switch (type) {
    case NVML_CLOCK_GRAPHICS:
    case NVML_CLOCK_SM:
        return 1980;
    case NVML_CLOCK_MEM:
        return 2619;
    default: /* NVML_CLOCK_VIDEO */
        return 1755;
    }
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, unsigned int type, unsigned int *clock)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_CLOCKS, clock && type <= NVML_CLOCK_VIDEO, 0, &r);
    if (rc == NVML_SUCCESS)
        *clock = clock_mhz(type);
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetMaxClockInfo(nvmlDevice_t device, unsigned int type,
                                       unsigned int *clock)
{
    return nvmlDeviceGetClockInfo(device, type, clock);
}

nvmlReturn_t nvmlDeviceGetClock(nvmlDevice_t device, unsigned int clockType,
                                unsigned int clockId, unsigned int *clockMHz)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_CLOCKS,
                                clockMHz && clockType <= NVML_CLOCK_VIDEO &&
                                    clockId < NVML_CLOCK_ID_COUNT,
                                0, &r);
    if (rc == NVML_SUCCESS)
        *clockMHz = clock_mhz(clockType);
    return leave(rc);
}

static nvmlReturn_t throttle(nvmlDevice_t device, unsigned long long *reasons,
                             unsigned long long value)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_THROTTLE, reasons != NULL, 0, &r);
    if (rc == NVML_SUCCESS)
        *reasons = value;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device,
                                                       unsigned long long *clocksThrottleReasons)
{
    return throttle(device, clocksThrottleReasons, 0);
}
nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device,
                                                    unsigned long long *clocksEventReasons)
{
    return throttle(device, clocksEventReasons, 0);
}
nvmlReturn_t nvmlDeviceGetSupportedClocksThrottleReasons(nvmlDevice_t device,
                                                         unsigned long long *supported)
{
    return throttle(device, supported, SUPPORTED_THROTTLE);
}
nvmlReturn_t nvmlDeviceGetSupportedClocksEventReasons(nvmlDevice_t device,
                                                      unsigned long long *supported)
{
    return throttle(device, supported, SUPPORTED_THROTTLE);
}

static nvmlReturn_t pcie(nvmlDevice_t device, unsigned int *out, unsigned int value)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_PCIE, out != NULL, 0, &r);
    if (rc == NVML_SUCCESS)
        *out = value;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetCurrPcieLinkGeneration(nvmlDevice_t device, unsigned int *currLinkGen)
{
    return pcie(device, currLinkGen, 5);
}
nvmlReturn_t nvmlDeviceGetCurrPcieLinkWidth(nvmlDevice_t device, unsigned int *currLinkWidth)
{
    return pcie(device, currLinkWidth, 16);
}
nvmlReturn_t nvmlDeviceGetMaxPcieLinkGeneration(nvmlDevice_t device, unsigned int *maxLinkGen)
{
    return pcie(device, maxLinkGen, 5);
}
nvmlReturn_t nvmlDeviceGetMaxPcieLinkWidth(nvmlDevice_t device, unsigned int *maxLinkWidth)
{
    return pcie(device, maxLinkWidth, 16);
}

/* ---- ECC, retired pages, remapped rows -------------------------------------------- */

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, unsigned int errorType,
                                         unsigned int counterType, unsigned long long *eccCounts)
{
    struct ref r;
    int ok = eccCounts && errorType <= NVML_MEMORY_ERROR_TYPE_UNCORRECTED &&
             counterType <= NVML_AGGREGATE_ECC;
    nvmlReturn_t rc = enter_dev(device, F_ECC_ERRORS, ok, 0, &r);
    if (rc == NVML_SUCCESS) {
        if (errorType == NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
            *eccCounts = 0;
        else if (counterType == NVML_VOLATILE_ECC)
            *eccCounts = r.gpu;
        else
            *eccCounts = 10ull * r.gpu;
    }
    return leave(rc);
}

/* No page is ever retired; the count protocol is still the real one. */
static nvmlReturn_t retired_pages(nvmlDevice_t device, unsigned int cause,
                                  unsigned int *pageCount, unsigned long long *addresses,
                                  unsigned long long *timestamps)
{
    const unsigned int have = 0;
    struct ref r;
    int ok = pageCount && cause < NVML_PAGE_RETIREMENT_CAUSE_COUNT &&
             (*pageCount == 0 || addresses);
    nvmlReturn_t rc = enter_dev(device, F_RETIRED, ok, 0, &r);
    if (rc == NVML_SUCCESS) {
        if (*pageCount < have)
            rc = NVML_ERROR_INSUFFICIENT_SIZE;
        for (unsigned int p = 0; rc == NVML_SUCCESS && p < have; p++) {
            addresses[p] = 0;
            if (timestamps)
                timestamps[p] = 0;
        }
        *pageCount = have;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetRetiredPages(nvmlDevice_t device, unsigned int cause,
                                       unsigned int *pageCount, unsigned long long *addresses)
{
    return retired_pages(device, cause, pageCount, addresses, NULL);
}

nvmlReturn_t nvmlDeviceGetRetiredPages_v2(nvmlDevice_t device, unsigned int cause,
                                          unsigned int *pageCount, unsigned long long *addresses,
                                          unsigned long long *timestamps)
{
    return retired_pages(device, cause, pageCount, addresses, timestamps);
}

nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t device, unsigned int *isPending)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_RETIRED, isPending != NULL, 0, &r);
    if (rc == NVML_SUCCESS)
        *isPending = NVML_FEATURE_DISABLED;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetRemappedRows(nvmlDevice_t device, unsigned int *corrRows,
                                       unsigned int *uncRows, unsigned int *isPending,
                                       unsigned int *failureOccurred)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_REMAPPED,
                                corrRows && uncRows && isPending && failureOccurred, 0, &r);
    if (rc == NVML_SUCCESS) {
        *corrRows = r.gpu;
        *uncRows = 0;
        *isPending = 0;
        *failureOccurred = 0;
    }
    return leave(rc);
}

/* ---- events --------------------------------------------------------------------------- */

static struct nvmlEventSet_st *set_of(nvmlEventSet_t set)
{
    uintptr_t p = (uintptr_t)set, b = (uintptr_t)g_sets;
    if (p < b || p >= b + sizeof(g_sets) || (p - b) % sizeof(g_sets[0]) != 0)
        return NULL;
    return set->used ? set : NULL;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set)
{
    nvmlReturn_t rc = enter();
    if (rc != NVML_SUCCESS)
        return leave(rc);
    if (!set)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    for (unsigned int s = 0; s < MAX_SETS; s++) {
        if (!g_sets[s].used) {
            memset(&g_sets[s], 0, sizeof(g_sets[s]));
            g_sets[s].used = 1;
            *set = &g_sets[s];
            return leave(NVML_SUCCESS);
        }
    }
    return leave(NVML_ERROR_MEMORY);
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set)
{
    nvmlReturn_t rc = enter();
    if (rc == NVML_SUCCESS) {
        struct nvmlEventSet_st *s = set_of(set);
        if (s)
            s->used = 0;
        else
            rc = NVML_ERROR_INVALID_ARGUMENT;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *eventTypes)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_EVENTS, eventTypes != NULL, 0, &r);
    if (rc == NVML_SUCCESS)
        *eventTypes = SUPPORTED_EVENTS;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes,
                                      nvmlEventSet_t set)
{
    struct ref r;
    nvmlReturn_t rc = enter_dev(device, F_EVENTS, 1, 0, &r);
    if (rc == NVML_SUCCESS || rc == NVML_ERROR_GPU_IS_LOST || rc == NVML_ERROR_NOT_SUPPORTED) {
        struct nvmlEventSet_st *s = set_of(set);
        if (!s)
            rc = NVML_ERROR_INVALID_ARGUMENT;
        else if (rc == NVML_SUCCESS && (eventTypes & ~SUPPORTED_EVENTS))
            rc = NVML_ERROR_NOT_SUPPORTED;
        else if (rc == NVML_SUCCESS)
            s->mask[r.gpu] |= eventTypes;
    }
    return leave(rc);
}

/* With g_lock held: the first undelivered xid line (file order) this set listens for. */
static int take_event(struct nvmlEventSet_st *s, nvmlEventData_t *data)
{
    for (unsigned int n = 0; n < g_cfg.nxid; n++) {
        unsigned int gpu = g_cfg.xid[n].gpu;
        if (g_xid_done[n] || gpu >= g_cfg.gpus || !(s->mask[gpu] & EV_XID))
            continue;
        g_xid_done[n] = 1;
        memset(data, 0, sizeof(*data));
        data->device = &g_phys[gpu];
        data->eventType = EV_XID;
        data->eventData = g_cfg.xid[n].code;
        data->gpuInstanceId = 0xFFFFFFFFu; /* not attributed to a GPU/compute instance */
        data->computeInstanceId = 0xFFFFFFFFu;
        return 1;
    }
    return 0;
}

static long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
    const long long start = now_ms();
    for (;;) {
        nvmlReturn_t rc = enter();
        if (rc == NVML_SUCCESS) {
            struct nvmlEventSet_st *s = set_of(set);
            if (!s || !data)
                rc = NVML_ERROR_INVALID_ARGUMENT;
            else if (!take_event(s, data))
                rc = NVML_ERROR_TIMEOUT;
        }
        leave(rc);
        if (rc != NVML_ERROR_TIMEOUT)
            return rc;
        long long left = (long long)timeoutms - (now_ms() - start);
        if (left <= 0)
            return NVML_ERROR_TIMEOUT;
        long long step = left < 20 ? left : 20;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = step * 1000000L};
        nanosleep(&ts, NULL);
    }
}

nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
    return nvmlEventSetWait_v2(set, data, timeoutms);
}
