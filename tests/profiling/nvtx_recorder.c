// nvtx_recorder: an NVTX injection library that writes every range event to a file.
//
// Nsight Systems is one NVTX tool; this is another, small enough for a test. An application that
// calls NVTX (Python's `nvtx` package, hicache's C++ module: each carries the header-only NVTX3
// client) dlopens the library named by NVTX_INJECTION64_PATH on its first NVTX call and calls its
// InitializeInjectionNvtx2, which fills the client's function table with the callbacks below;
// every other NVTX call of that client becomes a no-op. Each client initialises separately, so
// this library may be initialised several times in one process.
//
// Output: the file named by NVTX_RECORDER_FILE, opened for appending (processes and threads may
// share it). One line per event, tab-separated, written by a single write(2) under a mutex:
//
//   kind  tid  domain  message  payload  range_id
//
// kind: push, pop, start, end or mark. tid: the OS thread id (gettid). domain: the domain's name;
// empty for the default domain (the non-domain API). message: the event's ASCII, wide (as
// multibyte) or registered message; empty for pop and end. payload: an int/float payload, else
// empty. range_id: the id of a start/end pair, else empty. Tabs and newlines in names become
// spaces.
//
// Build: cc -shared -fPIC -I<dir holding nvtx3/> nvtx_recorder.c -o libnvtx_recorder.so -lpthread
#define _GNU_SOURCE
#define NVTX_NO_IMPL  // a tool: NVTX3's types and declarations, not its client implementation
#include <fcntl.h>
#include <nvtx3/nvToolsExt.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <wchar.h>

enum { kLineBytes = 1024, kNameBytes = 256 };

// A domain or registered-string handle is a pointer to one of these, never freed: NVTX clients
// keep handles for the life of the process and may destroy a domain while another client (with
// its own handle of the same name) still uses it. Domains are deduplicated by name.
typedef struct Name {
  char text[kNameBytes];
  struct Name* next;
} Name;

static pthread_mutex_t g_mutex = PTHREAD_MUTEX_INITIALIZER;  // guards g_fd's writes, g_domains
static int g_fd = -1;                                        // set once, under g_mutex
static Name* g_domains = NULL;                               // the domains created so far
static uint64_t g_next_range_id = 1;                         // atomic: start/end ids

static void copy_clean(char* dst, size_t size, const char* src) {
  size_t i = 0;
  for (; src != NULL && src[i] != '\0' && i + 1 < size; ++i) {
    dst[i] = (src[i] == '\t' || src[i] == '\n' || src[i] == '\r') ? ' ' : src[i];
  }
  dst[i] = '\0';
}

static void wide_to_text(char* dst, size_t size, const wchar_t* src) {
  dst[0] = '\0';
  if (src == NULL) return;
  char buffer[kNameBytes];
  const size_t n = wcstombs(buffer, src, sizeof buffer - 1);
  if (n == (size_t)-1) {
    snprintf(dst, size, "<unconvertible wide string>");
    return;
  }
  buffer[n] = '\0';
  copy_clean(dst, size, buffer);
}

static Name* new_name(const char* text) {
  Name* name = calloc(1, sizeof *name);
  if (name != NULL) copy_clean(name->text, sizeof name->text, text);
  return name;
}

static const char* domain_name(nvtxDomainHandle_t domain) {
  return domain == NULL ? "" : ((const Name*)domain)->text;
}

static void message_text(char* dst, size_t size, const nvtxEventAttributes_t* attr) {
  dst[0] = '\0';
  if (attr == NULL) return;
  switch (attr->messageType) {
    case NVTX_MESSAGE_TYPE_ASCII:
      copy_clean(dst, size, attr->message.ascii);
      break;
    case NVTX_MESSAGE_TYPE_UNICODE:
      wide_to_text(dst, size, attr->message.unicode);
      break;
    case NVTX_MESSAGE_TYPE_REGISTERED:
      if (attr->message.registered != NULL) {
        copy_clean(dst, size, ((const Name*)attr->message.registered)->text);
      }
      break;
    default:
      break;
  }
}

static void payload_text(char* dst, size_t size, const nvtxEventAttributes_t* attr) {
  dst[0] = '\0';
  if (attr == NULL) return;
  switch (attr->payloadType) {
    case NVTX_PAYLOAD_TYPE_INT64:
      snprintf(dst, size, "%lld", (long long)attr->payload.llValue);
      break;
    case NVTX_PAYLOAD_TYPE_UNSIGNED_INT64:
      snprintf(dst, size, "%llu", (unsigned long long)attr->payload.ullValue);
      break;
    case NVTX_PAYLOAD_TYPE_INT32:
      snprintf(dst, size, "%d", (int)attr->payload.iValue);
      break;
    case NVTX_PAYLOAD_TYPE_UNSIGNED_INT32:
      snprintf(dst, size, "%u", (unsigned)attr->payload.uiValue);
      break;
    case NVTX_PAYLOAD_TYPE_DOUBLE:
      snprintf(dst, size, "%.17g", attr->payload.dValue);
      break;
    case NVTX_PAYLOAD_TYPE_FLOAT:
      snprintf(dst, size, "%.9g", (double)attr->payload.fValue);
      break;
    default:
      break;
  }
}

// Writes one event line; `message` and `payload` are already clean ("" when none).
static void emit(const char* kind, const char* domain, const char* message, const char* payload,
                 uint64_t range_id) {
  char id[32] = "";
  if (range_id != 0) snprintf(id, sizeof id, "%llu", (unsigned long long)range_id);
  char line[kLineBytes];
  int n = snprintf(line, sizeof line, "%s\t%ld\t%s\t%s\t%s\t%s\n", kind, (long)syscall(SYS_gettid),
                   domain, message, payload, id);
  if (n < 0) return;
  if (n >= (int)sizeof line) n = (int)sizeof line - 1;  // truncated: still one line
  line[n - 1] = '\n';
  pthread_mutex_lock(&g_mutex);
  if (g_fd >= 0) {
    const ssize_t written = write(g_fd, line, (size_t)n);
    (void)written;  // nowhere to report a failed write from inside the application
  }
  pthread_mutex_unlock(&g_mutex);
}

static void emit_attr(const char* kind, nvtxDomainHandle_t domain,
                      const nvtxEventAttributes_t* attr, uint64_t range_id) {
  char message[kNameBytes];
  char payload[64];
  message_text(message, sizeof message, attr);
  payload_text(payload, sizeof payload, attr);
  emit(kind, domain_name(domain), message, payload, range_id);
}

static void emit_ascii(const char* kind, const char* text, uint64_t range_id) {
  char message[kNameBytes];
  copy_clean(message, sizeof message, text);
  emit(kind, "", message, "", range_id);
}

static void emit_wide(const char* kind, const wchar_t* text, uint64_t range_id) {
  char message[kNameBytes];
  wide_to_text(message, sizeof message, text);
  emit(kind, "", message, "", range_id);
}

static uint64_t next_range_id(void) {
  return __atomic_fetch_add(&g_next_range_id, 1, __ATOMIC_RELAXED);
}

// ---- core: the default domain ------------------------------------------------------------------

static void NVTX_API mark_ex(const nvtxEventAttributes_t* attr) {
  emit_attr("mark", NULL, attr, 0);
}
static void NVTX_API mark_a(const char* message) { emit_ascii("mark", message, 0); }
static void NVTX_API mark_w(const wchar_t* message) { emit_wide("mark", message, 0); }

static nvtxRangeId_t NVTX_API range_start_ex(const nvtxEventAttributes_t* attr) {
  const uint64_t id = next_range_id();
  emit_attr("start", NULL, attr, id);
  return id;
}
static nvtxRangeId_t NVTX_API range_start_a(const char* message) {
  const uint64_t id = next_range_id();
  emit_ascii("start", message, id);
  return id;
}
static nvtxRangeId_t NVTX_API range_start_w(const wchar_t* message) {
  const uint64_t id = next_range_id();
  emit_wide("start", message, id);
  return id;
}
static void NVTX_API range_end(nvtxRangeId_t id) { emit("end", "", "", "", id); }

// Push/pop return the nesting level; nothing in hicache reads it, so 0 ("accepted") will do.
static int NVTX_API range_push_ex(const nvtxEventAttributes_t* attr) {
  emit_attr("push", NULL, attr, 0);
  return 0;
}
static int NVTX_API range_push_a(const char* message) {
  emit_ascii("push", message, 0);
  return 0;
}
static int NVTX_API range_push_w(const wchar_t* message) {
  emit_wide("push", message, 0);
  return 0;
}
static int NVTX_API range_pop(void) {
  emit("pop", "", "", "", 0);
  return 0;
}

// ---- core2: domains and registered strings -----------------------------------------------------

static void NVTX_API domain_mark_ex(nvtxDomainHandle_t domain, const nvtxEventAttributes_t* attr) {
  emit_attr("mark", domain, attr, 0);
}
static nvtxRangeId_t NVTX_API domain_range_start_ex(nvtxDomainHandle_t domain,
                                                    const nvtxEventAttributes_t* attr) {
  const uint64_t id = next_range_id();
  emit_attr("start", domain, attr, id);
  return id;
}
static void NVTX_API domain_range_end(nvtxDomainHandle_t domain, nvtxRangeId_t id) {
  emit("end", domain_name(domain), "", "", id);
}
static int NVTX_API domain_range_push_ex(nvtxDomainHandle_t domain,
                                         const nvtxEventAttributes_t* attr) {
  emit_attr("push", domain, attr, 0);
  return 0;
}
static int NVTX_API domain_range_pop(nvtxDomainHandle_t domain) {
  emit("pop", domain_name(domain), "", "", 0);
  return 0;
}

static nvtxStringHandle_t NVTX_API domain_register_string_a(nvtxDomainHandle_t domain,
                                                            const char* text) {
  (void)domain;
  return (nvtxStringHandle_t)new_name(text);
}
static nvtxStringHandle_t NVTX_API domain_register_string_w(nvtxDomainHandle_t domain,
                                                            const wchar_t* text) {
  (void)domain;
  char buffer[kNameBytes];
  wide_to_text(buffer, sizeof buffer, text);
  return (nvtxStringHandle_t)new_name(buffer);
}

static nvtxDomainHandle_t NVTX_API domain_create_a(const char* text) {
  char clean[kNameBytes];
  copy_clean(clean, sizeof clean, text);
  pthread_mutex_lock(&g_mutex);
  Name* domain = g_domains;
  while (domain != NULL && strcmp(domain->text, clean) != 0) domain = domain->next;
  if (domain == NULL && (domain = new_name(clean)) != NULL) {
    domain->next = g_domains;
    g_domains = domain;
  }
  pthread_mutex_unlock(&g_mutex);
  return (nvtxDomainHandle_t)domain;
}
static nvtxDomainHandle_t NVTX_API domain_create_w(const wchar_t* text) {
  char buffer[kNameBytes];
  wide_to_text(buffer, sizeof buffer, text);
  return domain_create_a(buffer);
}
static void NVTX_API domain_destroy(nvtxDomainHandle_t domain) { (void)domain; }  // see Name
static void NVTX_API initialize(const void* reserved) { (void)reserved; }

// ---- injection entry point ---------------------------------------------------------------------

// One callback for one slot of a client's function table (NVTX_CBID_* of its module).
typedef struct Slot {
  int id;
  NvtxFunctionPointer fn;
} Slot;

static int set_slots(const NvtxExportTableCallbacks* callbacks, NvtxCallbackModule module,
                     const Slot* slots, int count) {
  NvtxFunctionTable table = NULL;
  unsigned int size = 0;
  if (!callbacks->GetModuleFunctionTable(module, &table, &size) || table == NULL) return 0;
  for (int i = 0; i < count; ++i) {
    const unsigned int id = (unsigned int)slots[i].id;
    if (id < size && table[id] != NULL) *table[id] = slots[i].fn;
  }
  return 1;
}

#define FN(f) ((NvtxFunctionPointer)(f))

// Called by each NVTX client on its first NVTX call. Returns 1 to attach, 0 to leave NVTX off.
int NVTX_API InitializeInjectionNvtx2(NvtxGetExportTableFunc_t get_export_table) {
  pthread_mutex_lock(&g_mutex);
  if (g_fd < 0) {
    const char* path = getenv("NVTX_RECORDER_FILE");
    if (path == NULL || path[0] == '\0') {
      fprintf(stderr, "nvtx_recorder: NVTX_RECORDER_FILE is not set; recording nothing\n");
    } else {
      g_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      if (g_fd < 0) fprintf(stderr, "nvtx_recorder: cannot open %s\n", path);
    }
  }
  const int ready = g_fd >= 0;
  pthread_mutex_unlock(&g_mutex);
  if (!ready) return 0;
  const NvtxExportTableCallbacks* callbacks =
      (const NvtxExportTableCallbacks*)get_export_table(NVTX_ETID_CALLBACKS);
  if (callbacks == NULL || callbacks->struct_size < sizeof *callbacks) return 0;

  const Slot core[] = {
      {NVTX_CBID_CORE_MarkEx, FN(mark_ex)},
      {NVTX_CBID_CORE_MarkA, FN(mark_a)},
      {NVTX_CBID_CORE_MarkW, FN(mark_w)},
      {NVTX_CBID_CORE_RangeStartEx, FN(range_start_ex)},
      {NVTX_CBID_CORE_RangeStartA, FN(range_start_a)},
      {NVTX_CBID_CORE_RangeStartW, FN(range_start_w)},
      {NVTX_CBID_CORE_RangeEnd, FN(range_end)},
      {NVTX_CBID_CORE_RangePushEx, FN(range_push_ex)},
      {NVTX_CBID_CORE_RangePushA, FN(range_push_a)},
      {NVTX_CBID_CORE_RangePushW, FN(range_push_w)},
      {NVTX_CBID_CORE_RangePop, FN(range_pop)},
  };
  const Slot core2[] = {
      {NVTX_CBID_CORE2_DomainMarkEx, FN(domain_mark_ex)},
      {NVTX_CBID_CORE2_DomainRangeStartEx, FN(domain_range_start_ex)},
      {NVTX_CBID_CORE2_DomainRangeEnd, FN(domain_range_end)},
      {NVTX_CBID_CORE2_DomainRangePushEx, FN(domain_range_push_ex)},
      {NVTX_CBID_CORE2_DomainRangePop, FN(domain_range_pop)},
      {NVTX_CBID_CORE2_DomainRegisterStringA, FN(domain_register_string_a)},
      {NVTX_CBID_CORE2_DomainRegisterStringW, FN(domain_register_string_w)},
      {NVTX_CBID_CORE2_DomainCreateA, FN(domain_create_a)},
      {NVTX_CBID_CORE2_DomainCreateW, FN(domain_create_w)},
      {NVTX_CBID_CORE2_DomainDestroy, FN(domain_destroy)},
      {NVTX_CBID_CORE2_Initialize, FN(initialize)},
  };
  return set_slots(callbacks, NVTX_CB_MODULE_CORE, core, (int)(sizeof core / sizeof core[0])) &&
         set_slots(callbacks, NVTX_CB_MODULE_CORE2, core2, (int)(sizeof core2 / sizeof core2[0]));
}
