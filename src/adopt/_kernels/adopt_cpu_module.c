/*
 * CPython binding of the fused CPU kernel: adopt._kernels._adopt_cpu.
 *
 * Entry points:
 * - step() takes the tensor lists of the functional API;
 * - step_groups() takes an optimizer's param groups and state dict and gathers the lists
 *   itself, for ADOPT.step()'s steady state (every parameter with a gradient has state).
 *   It never reports a problem: whenever anything needs the general path (no state yet, a
 *   tensor it cannot take, an error to raise) it declines, having changed nothing;
 * - step_state() takes the lists of a step whose moments are stored in a low-memory format
 *   ("bf16" or "8bit" codes and block scales, adopt/_state_formats.py) and raises a
 *   ValueError / TypeError naming the list and index of the first tensor that is not right;
 *   codes and bf16 moments must have their param's element count (any shape), scales
 *   ceil(numel / 256); no tensor the step writes may share memory with any other;
 * - check_lists() tells the general path, at C speed, whether every parameter's gradient
 *   and state match it in shape, dtype and device (on any device);
 * - host_steps() reads float32 CPU step counters.
 *
 * Tensor metadata (dtype, device, layout, sizes, strides, storage offset and size, data
 * pointer) is read through torch's C shim, the stable C ABI that libtorch exports for
 * AOTInductor (aoti_torch_get_*), resolved when the module is imported: a few nanoseconds
 * per field and no PyTorch headers. The shim takes an at::Tensor*; the module finds the
 * at::Tensor inside each Python tensor object (the layout is verified against torch at
 * import; if it cannot be, the module does not import and the fused CPU path is off).
 *
 * Memory safety: nothing is cached between calls; every call reads every tensor's
 * metadata afresh. A call runs in two phases:
 * 1. gather: everything that can run Python code happens first (a gradient getter of a
 *    __torch_function__ subclass, Tensor.__hash__ in a state lookup, __float__ of a
 *    hyperparameter, a garbage collection started by an allocation), and the call holds
 *    its own references to every object it uses, including snapshots of the lists;
 * 2. validate and run: metadata reads, bounds and overlap checks and the kernel, without
 *    running Python code and with the GIL held throughout, so no other thread and no
 *    finalizer can change a tensor between its check and the kernel's last write.
 * Every tensor the kernel touches is a dense, contiguous CPU tensor whose storage holds
 * all its elements. Lists whose tensors overlap in memory across parameters (the same
 * parameter twice in a group, views of one buffer) run on one thread in list order, which
 * is deterministic; a parameter whose own gradient or state overlaps its other tensors is
 * refused.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <stdlib.h>
#include <string.h>

#ifdef _WIN32
#include <windows.h>
#else
#include <dlfcn.h>
#endif

#include "adopt_cpu.h"

/* Status codes returned by step(). */
#define STATUS_DONE 0
#define STATUS_NEEDS_GROUPING 1   /* params of several dtypes or a tensor off the CPU */
#define STATUS_NEEDS_CONTIGUOUS 2 /* some tensor is not contiguous */
#define STATUS_NEEDS_UNWRAP 3     /* a tensor whose memory this module cannot read (DTensor, ...) */
#define STATUS_DECLINED 4         /* step_groups(): the general path must run this step */

#define N_LISTS 5 /* params, grads, exp_avgs, exp_avg_sqs, state_steps */
#define N_DTYPES 4 /* adopt_dtype: float32, float64, float16, bfloat16 */

static const char *const list_names[N_LISTS] = {"params", "grads", "exp_avgs", "exp_avg_sqs",
                                                "state_steps"};
static const int64_t itemsizes[N_DTYPES] = {4, 8, 2, 2};

/* torch._C.TensorBase (every Python tensor is an instance), what __torch_dispatch__ is on
 * every tensor type that owns its memory (wrapper subclasses such as DTensor override it),
 * and the descriptor of a tensor's .grad. */
static PyTypeObject *tensor_base_type;
static PyObject *disabled_dispatch, *str_torch_dispatch, *attr_grad;
/* The keys of a parameter's state dict. */
static PyObject *str_exp_avg, *str_exp_avg_sq, *str_step, *str_seed;
/* torch._C._increment_version: the kernel writes parameters through their data pointers,
 * which autograd does not see, so each call bumps their version counters as an in-place
 * torch op would (a backward through a graph that saved a parameter before the step then
 * raises instead of using the new values). */
static PyObject *increment_version;

/* Bumps the version counter of every tensor in the tuple `tensors`. 0, or -1 with an
 * exception. Runs in phase 1 (torch's function runs no Python code, but allocates). */
static int bump_versions(PyObject *tensors) {
    PyObject *r = PyObject_CallOneArg(increment_version, tensors);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* Negated-view detection, set at import (see find_neg_bit): the TensorImpl word and bit. */
static int neg_word = -1;
static uint64_t neg_mask;
static const char *impl_of(PyObject *x);

/* Whether the negated-view bit is known and set in x's TensorImpl (runs no Python code). */
static int neg_bit_set(PyObject *x) {
    return neg_word >= 0 && (((const uint64_t *)impl_of(x))[neg_word] & neg_mask) != 0;
}

/* ---- torch's C shim ------------------------------------------------------------------ */

typedef int32_t shim_rc; /* AOTITorchError: 0 is success */
typedef void *shim_tensor; /* AtenTensorHandle: an at::Tensor* */

static struct {
    shim_rc (*data_ptr)(shim_tensor, void **);
    shim_rc (*storage_size)(shim_tensor, int64_t *);
    shim_rc (*storage_offset)(shim_tensor, int64_t *);
    shim_rc (*dim)(shim_tensor, int64_t *);
    shim_rc (*sizes)(shim_tensor, int64_t **);
    shim_rc (*strides)(shim_tensor, int64_t **);
    shim_rc (*dtype)(shim_tensor, int32_t *);
    shim_rc (*device_type)(shim_tensor, int32_t *);
    shim_rc (*device_index)(shim_tensor, int32_t *);
    shim_rc (*layout)(shim_tensor, int32_t *);
} shim;

/* torch's codes for the kernel's dtypes (adopt_dtype order), the CPU and the strided layout. */
static int32_t dtype_codes[N_DTYPES], cpu_code, strided_code, int64_code, uint8_code;

/* Where a Python tensor keeps its at::Tensor: right after the object header (torch >= 2.10
 * stores it there), or only reachable as the TensorImpl* that `_cdata` returns (an at::Tensor
 * is one TensorImpl pointer, so a local copy of that pointer is a valid handle). */
enum { ACCESS_INLINE, ACCESS_CDATA };
static int access_mode;
static PyObject *attr_cdata;

/* What the module needs to know about one tensor. Sizes are borrowed from the tensor: valid
 * while no Python code runs. */
typedef struct {
    void *data;            /* first element; read only when asked for */
    const int64_t *sizes;
    int64_t dim, numel;
    int32_t dtype, device_type, device_index;
    int contiguous;        /* dense in row-major order */
    int in_bounds;         /* its storage holds every element (when data was asked for) */
} meta_t;

/*
 * 1 when x is a tensor whose data pointer is its own memory: a TensorBase instance whose
 * type does not override __torch_dispatch__. 0 otherwise (a wrapper subclass such as DTensor,
 * whose data is elsewhere, or not a tensor). Runs no Python code (_PyType_Lookup only reads
 * the types' dicts).
 */
static int owns_memory(PyObject *x) {
    if (!PyObject_TypeCheck(x, tensor_base_type)) return 0;
    return _PyType_Lookup(Py_TYPE(x), str_torch_dispatch) == disabled_dispatch;
}

static int dtype_index(int32_t code) {
    int k = 0;
    while (k < N_DTYPES && code != dtype_codes[k]) k++;
    return k;
}

/* Row-major density: strides of dimensions longer than 1 are the products of later sizes. */
static int dense(const int64_t *sizes, const int64_t *strides, int64_t dim) {
    int64_t expected = 1;
    for (int64_t d = dim - 1; d >= 0; d--) {
        if (sizes[d] != 1 && strides[d] != expected) return 0;
        expected *= sizes[d];
    }
    return 1;
}

/* Whether a storage of `capacity` items holds every item the view (offset, sizes, strides)
 * addresses; computed without overflow. */
static int view_fits(int64_t capacity, int64_t offset, const int64_t *sizes, const int64_t *strides,
                     int64_t dim) {
    if (offset < 0 || offset >= capacity) return 0;
    int64_t last = offset; /* the highest item addressed */
    for (int64_t d = 0; d < dim; d++) {
        if (sizes[d] <= 1) continue;
        if (strides[d] < 0 || (strides[d] > 0 && strides[d] > (capacity - 1 - last) / (sizes[d] - 1))) return 0;
        last += (sizes[d] - 1) * strides[d];
    }
    return 1;
}

static size_t (*shim_element_size)(int32_t); /* optional */

static int64_t itemsize_of(int32_t code) {
    const int k = dtype_index(code);
    if (k < N_DTYPES) return itemsizes[k];
    if (code == int64_code) return 8;
    if (code == uint8_code) return 1;
    return shim_element_size == NULL ? 0 : (int64_t)shim_element_size(code);
}

/* The shim's handle of tensor x; `holder` backs it under ACCESS_CDATA and must outlive it.
 * 0, or -1 with a Python exception. */
static int handle_of(PyObject *x, void **holder, shim_tensor *out) {
    if (access_mode == ACCESS_INLINE) {
        *out = (char *)x + sizeof(PyObject);
        return 0;
    }
    PyObject *r = Py_TYPE(attr_cdata)->tp_descr_get(attr_cdata, x, (PyObject *)Py_TYPE(x));
    if (r == NULL) return -1;
    *holder = PyLong_AsVoidPtr(r);
    Py_DECREF(r);
    if (*holder == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "a tensor without a TensorImpl");
        return -1;
    }
    *out = holder;
    return 0;
}

/*
 * Reads x's metadata, its storage's bounds, and its data pointer when `with_data`. Returns 0,
 * or 1 when x is not a tensor this module can read (it does not own its memory, has no
 * storage, is not strided, or the shim failed), or -1 with a Python exception. Runs no
 * Python code (under ACCESS_CDATA it calls TensorBase._cdata's C getter, which runs none).
 */
static int read_meta(PyObject *x, int with_data, meta_t *m) {
    if (!owns_memory(x)) return 1;
    void *holder;
    shim_tensor t;
    if (handle_of(x, &holder, &t) < 0) return -1;
    int32_t layout = strided_code;
    int64_t *sizes, *strides, offset, nbytes;
    if ((shim.layout != NULL && shim.layout(t, &layout)) || layout != strided_code || shim.dtype(t, &m->dtype) ||
        shim.device_type(t, &m->device_type) || shim.device_index(t, &m->device_index) || shim.dim(t, &m->dim) ||
        shim.sizes(t, &sizes) || shim.strides(t, &strides) || shim.storage_offset(t, &offset) ||
        shim.storage_size(t, &nbytes))
        return 1;
    m->sizes = sizes;
    m->numel = 1;
    for (int64_t d = 0; d < m->dim; d++) m->numel *= sizes[d];
    /* A negated view needs a resolved stand-in, like a strided one (see is_neg_view). */
    m->contiguous = dense(sizes, strides, m->dim) &&
                    !neg_bit_set(x);
    const int64_t itemsize = itemsize_of(m->dtype);
    m->in_bounds = m->numel == 0 || (itemsize > 0 && view_fits(nbytes / itemsize, offset, sizes, strides, m->dim));
    m->data = NULL;
    if (with_data && m->numel > 0 && m->in_bounds && (shim.data_ptr(t, &m->data) || m->data == NULL))
        m->in_bounds = 0;
    return 0;
}

static int same_shape(const meta_t *a, const meta_t *b) {
    return a->dim == b->dim && (a->dim == 0 || memcmp(a->sizes, b->sizes, (size_t)a->dim * sizeof(int64_t)) == 0);
}

/* Pointer of a float32 (k = ADOPT_F32) or float64 CPU tensor with `count` elements, else
 * ValueError naming it. */
static int buffer_of(PyObject *t, int k, int64_t count, const char *name, void **out) {
    meta_t m;
    const int rc = read_meta(t, 1, &m);
    if (rc < 0) return -1;
    if (rc > 0 || m.dtype != dtype_codes[k] || m.device_type != cpu_code || !m.contiguous ||
        m.numel != count || !m.in_bounds) {
        PyErr_Format(PyExc_ValueError, "%s must be a contiguous %s CPU tensor with %lld element(s)", name,
                     k == ADOPT_F32 ? "float32" : "float64", (long long)count);
        return -1;
    }
    *out = m.data;
    return 0;
}

static int float_buffer(PyObject *t, const char *name, float **out) {
    return buffer_of(t, ADOPT_F32, 1, name, (void **)out);
}

/* Pointer of a one-element int64 CPU tensor (a stochastic-rounding seed), else ValueError. */
static int seed_buffer(PyObject *t, Py_ssize_t i, int64_t **out) {
    meta_t m;
    const int rc = read_meta(t, 1, &m);
    if (rc < 0) return -1;
    if (rc > 0 || m.dtype != int64_code || m.device_type != cpu_code || m.numel != 1 || !m.in_bounds) {
        PyErr_Format(PyExc_ValueError, "seeds[%zd] must be a one-element int64 CPU tensor", i);
        return -1;
    }
    *out = (int64_t *)m.data;
    return 0;
}

/* ---- binding the shim at import ---------------------------------------------------------- */

#ifdef _WIN32
typedef HMODULE library_t;
static library_t open_library(const char *path) { return GetModuleHandleA(path); }
static void *find_symbol(library_t lib, const char *name) { return (void *)GetProcAddress(lib, name); }
#else
typedef void *library_t;
static library_t open_library(const char *path) {
    library_t lib = dlopen(path, RTLD_LAZY | RTLD_NOLOAD); /* torch has loaded it already */
    return lib != NULL ? lib : dlopen(path, RTLD_LAZY);
}
static void *find_symbol(library_t lib, const char *name) { return dlsym(lib, name); }
#endif

/* libtorch_cpu's path from torch/__init__.py's: <torch>/lib/<name>. New reference or NULL. */
static PyObject *torch_cpu_library_path(PyObject *torch) {
#if defined(_WIN32)
    (void)torch;
    return PyUnicode_FromString("torch_cpu.dll");
#else
#if defined(__APPLE__)
    const char *name = "libtorch_cpu.dylib";
#else
    const char *name = "libtorch_cpu.so";
#endif
    PyObject *os_path = PyImport_ImportModule("os.path");
    PyObject *file = os_path == NULL ? NULL : PyObject_GetAttrString(torch, "__file__");
    PyObject *dir = file == NULL ? NULL : PyObject_CallMethod(os_path, "dirname", "O", file);
    PyObject *path = dir == NULL ? NULL : PyObject_CallMethod(os_path, "join", "Oss", dir, "lib", name);
    Py_XDECREF(dir);
    Py_XDECREF(file);
    Py_XDECREF(os_path);
    return path;
#endif
}

/* Resolves the shim's functions; 0, or -1 with ImportError naming what is missing. */
static int bind_shim(PyObject *torch) {
    PyObject *path = torch_cpu_library_path(torch);
    if (path == NULL) return -1;
    const char *c_path = PyUnicode_AsUTF8(path);
    library_t lib = c_path == NULL ? NULL : open_library(c_path);
    if (lib == NULL) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ImportError, "cannot open %U", path);
        Py_DECREF(path);
        return -1;
    }
    Py_DECREF(path);
    static const char *const required[] = {
        "aoti_torch_get_data_ptr", "aoti_torch_get_storage_size", "aoti_torch_get_storage_offset",
        "aoti_torch_get_dim", "aoti_torch_get_sizes", "aoti_torch_get_strides", "aoti_torch_get_dtype",
        "aoti_torch_get_device_type", "aoti_torch_get_device_index"};
    void *found[sizeof required / sizeof *required];
    for (size_t i = 0; i < sizeof required / sizeof *required; i++) {
        found[i] = find_symbol(lib, required[i]);
        if (found[i] == NULL) {
            PyErr_Format(PyExc_ImportError, "torch's C shim has no %s", required[i]);
            return -1;
        }
    }
    memcpy(&shim.data_ptr, &found[0], sizeof(void *));
    memcpy(&shim.storage_size, &found[1], sizeof(void *));
    memcpy(&shim.storage_offset, &found[2], sizeof(void *));
    memcpy(&shim.dim, &found[3], sizeof(void *));
    memcpy(&shim.sizes, &found[4], sizeof(void *));
    memcpy(&shim.strides, &found[5], sizeof(void *));
    memcpy(&shim.dtype, &found[6], sizeof(void *));
    memcpy(&shim.device_type, &found[7], sizeof(void *));
    memcpy(&shim.device_index, &found[8], sizeof(void *));
    void *layout = find_symbol(lib, "aoti_torch_get_layout"); /* optional: strides fail for other layouts */
    memcpy(&shim.layout, &layout, sizeof(void *));
    void *element_size = find_symbol(lib, "aoti_torch_dtype_element_size"); /* optional: other dtypes */
    memcpy(&shim_element_size, &element_size, sizeof(void *));
    static const char *const codes[] = {"aoti_torch_dtype_float32", "aoti_torch_dtype_float64",
                                        "aoti_torch_dtype_float16", "aoti_torch_dtype_bfloat16",
                                        "aoti_torch_device_type_cpu", "aoti_torch_layout_strided",
                                        "aoti_torch_dtype_int64", "aoti_torch_dtype_uint8"};
    int32_t values[8];
    for (int i = 0; i < 8; i++) {
        void *f = find_symbol(lib, codes[i]);
        int32_t (*code)(void);
        if (f == NULL) {
            if (i == 5 && shim.layout == NULL) continue;
            PyErr_Format(PyExc_ImportError, "torch's C shim has no %s", codes[i]);
            return -1;
        }
        memcpy(&code, &f, sizeof f);
        values[i] = code();
    }
    memcpy(dtype_codes, values, sizeof dtype_codes);
    cpu_code = values[4];
    strided_code = shim.layout == NULL ? 0 : values[5];
    int64_code = values[6];
    uint8_code = values[7];
    return 0;
}

static int64_t int_method(PyObject *x, const char *name, PyObject *arg) {
    PyObject *r = arg == NULL ? PyObject_CallMethod(x, name, NULL) : PyObject_CallMethod(x, name, "O", arg);
    const int64_t v = r == NULL ? -1 : PyLong_AsLongLong(r);
    Py_XDECREF(r);
    return v;
}

/* Whether the shim, reached through access_mode, reports for x (a CPU tensor of kernel dtype
 * k with at most 8 dimensions) what Python reports. 1, 0, or -1 with an exception. */
static int shim_agrees(PyObject *x, int k) {
    PyObject *cdata = PyObject_GetAttrString(x, "_cdata");
    void *impl = cdata == NULL ? NULL : PyLong_AsVoidPtr(cdata);
    Py_XDECREF(cdata);
    if (impl == NULL) return -1;
    /* Under ACCESS_INLINE the at::Tensor after the header must hold that TensorImpl* before
     * the shim may be handed its address. */
    if (access_mode == ACCESS_INLINE && *(void **)((char *)x + sizeof(PyObject)) != impl) return 0;
    const int64_t dim = int_method(x, "dim", NULL);
    if (dim < 0 || dim > 8) return -1;
    int64_t sizes[8], strides[8];
    for (int64_t d = 0; d < dim; d++) {
        PyObject *index = PyLong_FromLongLong(d);
        sizes[d] = index == NULL ? -1 : int_method(x, "size", index);
        strides[d] = index == NULL ? -1 : int_method(x, "stride", index);
        Py_XDECREF(index);
    }
    PyObject *r = PyObject_CallMethod(x, "data_ptr", NULL);
    void *data = r == NULL ? NULL : PyLong_AsVoidPtr(r);
    Py_XDECREF(r);
    const int64_t offset = int_method(x, "storage_offset", NULL);
    PyObject *storage = PyObject_CallMethod(x, "untyped_storage", NULL);
    const int64_t nbytes = storage == NULL ? -1 : int_method(storage, "nbytes", NULL);
    Py_XDECREF(storage);
    if (PyErr_Occurred()) return -1;

    meta_t m;
    void *holder;
    shim_tensor t;
    int64_t *shim_strides, shim_offset, shim_nbytes;
    if (read_meta(x, 1, &m) != 0 || handle_of(x, &holder, &t) < 0 || shim.strides(t, &shim_strides) ||
        shim.storage_offset(t, &shim_offset) || shim.storage_size(t, &shim_nbytes)) {
        PyErr_Clear();
        return 0;
    }
    int64_t numel = 1;
    for (int64_t d = 0; d < dim; d++) numel *= sizes[d];
    const size_t bytes = (size_t)dim * sizeof(int64_t);
    return m.dim == dim && memcmp(m.sizes, sizes, bytes) == 0 && memcmp(shim_strides, strides, bytes) == 0 &&
           m.dtype == dtype_codes[k] && m.device_type == cpu_code && m.numel == numel && m.in_bounds &&
           m.data == data && shim_offset == offset && shim_nbytes == nbytes;
}

/* ---- prefetching tensor metadata ---------------------------------------------------------- */

/* When a step runs after a forward and backward pass, the tensors' Python objects and
 * TensorImpls are no longer in cache, and reading them one after the other costs a memory
 * latency per object. Prefetching them all first, one level at a time (the objects, then the
 * TensorImpls they point to), overlaps those misses. Hints only: nothing depends on them. */
#if defined(__GNUC__)
#define PREFETCH(addr) __builtin_prefetch((addr), 0, 3)
#else
#define PREFETCH(addr) ((void)0)
#endif

/* Bytes of a TensorImpl worth prefetching: its header, sizes and strides. */
#define IMPL_PREFETCH_BYTES 256
/* Where a TensorImpl keeps its StorageImpl*, in pointer-sized words from its start (found at
 * import among the first STORAGE_SLOT_SEARCH; -1: not found, the storage is not prefetched). */
#define STORAGE_SLOT_SEARCH 16
static int storage_slot = -1;

static const char *impl_of(PyObject *x) {
    return *(const char *const *)((const char *)x + sizeof(PyObject));
}

static void prefetch_tensors(PyObject *const *objs, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) PREFETCH(objs[i]);
    if (access_mode != ACCESS_INLINE) return;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyObject_TypeCheck(objs[i], tensor_base_type)) continue;
        const char *impl = impl_of(objs[i]);
        if (impl == NULL) continue;
        for (int off = 0; off < IMPL_PREFETCH_BYTES; off += 64) PREFETCH(impl + off);
    }
    if (storage_slot < 0) return;
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *impl = PyObject_TypeCheck(objs[i], tensor_base_type) ? impl_of(objs[i]) : NULL;
        if (impl == NULL) continue;
        const char *storage = ((const char *const *)impl)[storage_slot];
        PREFETCH(storage);
        PREFETCH(storage + 64);
    }
}

/* The word of a TensorImpl that holds x's StorageImpl* (what x.untyped_storage()._cdata
 * reports), or -1 when none of the first STORAGE_SLOT_SEARCH words does. */
static int storage_slot_of(PyObject *x) {
    PyObject *storage = PyObject_CallMethod(x, "untyped_storage", NULL);
    PyObject *cdata = storage == NULL ? NULL : PyObject_GetAttrString(storage, "_cdata");
    void *ptr = cdata == NULL ? NULL : PyLong_AsVoidPtr(cdata);
    Py_XDECREF(cdata);
    Py_XDECREF(storage);
    PyErr_Clear();
    if (ptr == NULL) return -1;
    const void *const *words = (const void *const *)impl_of(x);
    for (int w = 1; w < STORAGE_SLOT_SEARCH; w++)
        if (words[w] == ptr) return w;
    return -1;
}

/* Sets storage_slot when every sample (the import's (tensor, dtype index) pairs) agrees. */
static void find_storage_slot(PyObject *samples) {
    if (access_mode != ACCESS_INLINE) return;
    int slot = -1;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(samples); i++) {
        const int s = storage_slot_of(PyTuple_GET_ITEM(PyList_GET_ITEM(samples, i), 0));
        if (s < 0 || (slot >= 0 && s != slot)) return;
        slot = s;
    }
    storage_slot = slot;
}

/*
 * Lazily negated views (Tensor.is_neg(): x.conj().imag of a complex x, torch._neg_view) hold
 * -x as x's bits, and the kernel would read them raw. The shim cannot report the flag, so it
 * is found at import as the one bit of a TensorImpl word (among the first NEG_WORD_SEARCH)
 * that is set in every negated sample and clear in every plain one; it lives in the tensor's
 * dispatch key set. The search reads only words inside each sample's allocation, whose size
 * malloc_usable_size reports (glibc, and the allocators that replace its malloc); elsewhere,
 * or when no bit qualifies, Tensor.is_neg() is called instead (slower).
 */
#define NEG_WORD_SEARCH 32
static PyObject *str_is_neg;

/* 1 when x (a TensorBase instance) is a negated view, 0 when not, -1 with an exception. Runs
 * Python code (a __torch_function__ override of is_neg) only where the bit was not found. */
static int is_neg_view(PyObject *x) {
    if (neg_word >= 0) return neg_bit_set(x);
    PyObject *r = PyObject_CallMethodNoArgs(x, str_is_neg);
    if (r == NULL) return -1;
    const int neg = PyObject_IsTrue(r);
    Py_DECREF(r);
    return neg;
}

/* Where the bit is unknown: whether any tensor among objs[0..n) is a negated view (phase 1).
 * 1, 0, or -1 with an exception. */
static int any_neg_view_slow(PyObject *const *objs, Py_ssize_t n) {
    if (neg_word >= 0) return 0; /* read_meta sees the bit itself */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyObject_TypeCheck(objs[i], tensor_base_type)) continue;
        const int neg = is_neg_view(objs[i]);
        if (neg != 0) return neg;
    }
    return 0;
}

/* Sets neg_word and neg_mask from the import's samples and their torch._neg_view: the word
 * in which every negated view differs from its plain tensor in exactly one bit, the same bit
 * for all, set in the view. (The views are kept alive together, so that no two share an
 * address, which would make their pointers look alike.) */
static void find_neg_bit(PyObject *torch, PyObject *samples) {
    if (access_mode != ACCESS_INLINE) return;
    PyObject *neg_view = PyObject_GetAttrString(torch, "_neg_view");
    const Py_ssize_t n = PyList_GET_SIZE(samples);
    PyObject *negs = neg_view == NULL ? NULL : PyList_New(0);
    int ok = negs != NULL && n > 0;
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        PyObject *neg = PyObject_CallOneArg(neg_view, PyTuple_GET_ITEM(PyList_GET_ITEM(samples, i), 0));
        ok = neg != NULL && PyObject_TypeCheck(neg, tensor_base_type) && PyList_Append(negs, neg) == 0;
        Py_XDECREF(neg);
    }
    int found = -1, words = NEG_WORD_SEARCH;
    uint64_t mask = 0;
#if defined(__GLIBC__)
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        PyObject *objs[2] = {PyTuple_GET_ITEM(PyList_GET_ITEM(samples, i), 0), PyList_GET_ITEM(negs, i)};
        for (int j = 0; j < 2; j++) {
            const size_t usable = malloc_usable_size((void *)impl_of(objs[j])) / sizeof(uint64_t);
            if (usable < (size_t)words) words = (int)usable;
        }
    }
#else
    ok = 0;
#endif
    for (int w = 0; ok && w < words; w++) {
        uint64_t bit = 0;
        int qualifies = 1;
        for (Py_ssize_t i = 0; qualifies && i < n; i++) {
            const uint64_t a = ((const uint64_t *)impl_of(PyTuple_GET_ITEM(PyList_GET_ITEM(samples, i), 0)))[w];
            const uint64_t b = ((const uint64_t *)impl_of(PyList_GET_ITEM(negs, i)))[w];
            if (i == 0) bit = a ^ b;
            qualifies = bit != 0 && (bit & (bit - 1)) == 0 && (a ^ b) == bit && (b & bit) != 0;
        }
        if (!qualifies) continue;
        if (found >= 0) { /* two words qualify: ambiguous, use is_neg() */
            found = -1;
            break;
        }
        found = w;
        mask = bit;
    }
    Py_XDECREF(negs);
    Py_XDECREF(neg_view);
    PyErr_Clear();
    neg_word = found;
    neg_mask = mask;
}

/*
 * Chooses access_mode: the first one under which the shim agrees with Python on sample
 * tensors (plain, a Parameter, transposed, offset views, each kernel dtype). ImportError when
 * none does. ADOPT_CPU_TENSOR_ACCESS=cdata forces the _cdata route (tests cover both).
 */
static int choose_access(PyObject *torch) {
    PyObject *samples = PyList_New(0);
    if (samples == NULL) return -1;
    static const char *const dtype_names[N_DTYPES] = {"float32", "float64", "float16", "bfloat16"};
    int rc = 0;
    for (int k = 0; k < N_DTYPES && rc == 0; k++) {
        PyObject *dtype = PyObject_GetAttrString(torch, dtype_names[k]);
        PyObject *kw = dtype == NULL ? NULL : Py_BuildValue("{s:O}", "dtype", dtype);
        PyObject *empty = PyObject_GetAttrString(torch, "empty");
        PyObject *args = Py_BuildValue("(ii)", 5, 7);
        PyObject *base = empty == NULL || kw == NULL || args == NULL ? NULL : PyObject_Call(empty, args, kw);
        PyObject *nn = base == NULL ? NULL : PyObject_GetAttrString(torch, "nn");
        PyObject *param = nn == NULL ? NULL : PyObject_CallMethod(nn, "Parameter", "O", base);
        PyObject *transposed = param == NULL ? NULL : PyObject_CallMethod(base, "t", NULL);
        PyObject *flat = transposed == NULL ? NULL : PyObject_CallMethod(base, "view", "i", -1);
        PyObject *three = flat == NULL ? NULL : PyLong_FromLong(3);
        PyObject *slice = three == NULL ? NULL : PySlice_New(three, NULL, NULL);
        PyObject *offset = slice == NULL ? NULL : PyObject_GetItem(flat, slice);
        PyObject *items[] = {base, param, transposed, offset};
        for (int i = 0; i < 4 && rc == 0; i++) {
            PyObject *pair = items[i] == NULL ? NULL : Py_BuildValue("(Oi)", items[i], k);
            rc = pair == NULL ? -1 : PyList_Append(samples, pair);
            Py_XDECREF(pair);
        }
        Py_XDECREF(offset);
        Py_XDECREF(slice);
        Py_XDECREF(three);
        Py_XDECREF(flat);
        Py_XDECREF(transposed);
        Py_XDECREF(param);
        Py_XDECREF(nn);
        Py_XDECREF(base);
        Py_XDECREF(args);
        Py_XDECREF(empty);
        Py_XDECREF(kw);
        Py_XDECREF(dtype);
        if (PyErr_Occurred()) rc = -1;
    }
    const char *forced = getenv("ADOPT_CPU_TENSOR_ACCESS");
    const int first = forced != NULL && strcmp(forced, "cdata") == 0 ? ACCESS_CDATA : ACCESS_INLINE;
    int chosen = -1;
    for (int mode = first; rc == 0 && chosen < 0 && mode <= ACCESS_CDATA; mode++) {
        access_mode = mode;
        int agree = 1;
        for (Py_ssize_t i = 0; agree == 1 && i < PyList_GET_SIZE(samples); i++) {
            PyObject *pair = PyList_GET_ITEM(samples, i);
            agree = shim_agrees(PyTuple_GET_ITEM(pair, 0), (int)PyLong_AsLong(PyTuple_GET_ITEM(pair, 1)));
        }
        if (agree < 0) rc = -1;
        else if (agree) chosen = mode;
    }
    access_mode = chosen;
    if (chosen >= 0) {
        find_storage_slot(samples);
        find_neg_bit(torch, samples);
    }
    Py_DECREF(samples);
    if (rc < 0) return -1;
    if (chosen < 0) {
        PyErr_SetString(PyExc_ImportError,
                        "torch's C shim does not report tensor metadata as Python does for this torch build");
        return -1;
    }
    access_mode = chosen;
    return 0;
}

/* ---- validation: the per-call table ------------------------------------------------------ */

typedef struct {
    Py_ssize_t n;
    int dtype;       /* adopt_dtype of every tensor but the steps */
    int serial;      /* tensors of different params overlap: one thread, list order */
    void **ptrs;     /* N_LISTS * n data pointers, list-major */
    int64_t *numel;  /* n element counts */
    meta_t *params;  /* n param metadata (shapes the other lists must have) */
    int64_t **seeds; /* n stochastic-rounding seed pointers, or NULL: round to nearest */
} table_t;

static int table_alloc(table_t *t, Py_ssize_t n) {
    t->n = n;
    t->dtype = -1;
    t->serial = 0;
    t->ptrs = (void **)malloc((size_t)n * N_LISTS * sizeof(void *));
    t->numel = (int64_t *)malloc((size_t)n * sizeof(int64_t));
    t->params = (meta_t *)malloc((size_t)n * sizeof(meta_t));
    t->seeds = NULL;
    if (t->ptrs == NULL || t->numel == NULL || t->params == NULL) {
        free(t->ptrs);
        free(t->numel);
        free(t->params);
        t->ptrs = NULL;
        t->numel = NULL;
        t->params = NULL;
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void table_free(table_t *t) {
    free(t->seeds);
    t->seeds = NULL;
    free(t->ptrs);
    free(t->numel);
    free(t->params);
    t->ptrs = NULL;
    t->numel = NULL;
    t->params = NULL;
    t->n = 0;
}

static int storage_error_named(const char *name, Py_ssize_t i, const meta_t *m) {
    PyErr_Format(PyExc_ValueError,
                 "%s[%zd] has %lld element(s) but its storage does not hold them (freed or shrunk storage?)",
                 name, i, (long long)m->numel);
    return -1;
}

static int storage_error(int l, Py_ssize_t i, const meta_t *m) {
    PyErr_Format(PyExc_ValueError,
                 "%s[%zd] has %lld element(s) but its storage does not hold them (freed or shrunk storage?)",
                 list_names[l], i, (long long)m->numel);
    return -1;
}

/* Validates param i and records it in the table. Returns a status or -1. */
static int check_param(PyObject **items[N_LISTS], Py_ssize_t i, table_t *t) {
    meta_t *m = &t->params[i];
    const int rc = read_meta(items[0][i], 1, m);
    if (rc != 0) return rc < 0 ? -1 : STATUS_NEEDS_UNWRAP;
    const int k = dtype_index(m->dtype);
    if (t->dtype < 0) {
        if (k == N_DTYPES) {
            PyErr_Format(PyExc_TypeError,
                         "params[%zd]: the fused CPU kernel supports float64, float32, float16 and bfloat16 tensors",
                         i);
            return -1;
        }
        t->dtype = k;
    } else if (k != t->dtype) {
        return STATUS_NEEDS_GROUPING;
    }
    if (m->device_type != cpu_code) return STATUS_NEEDS_GROUPING;
    if (!m->contiguous) return STATUS_NEEDS_CONTIGUOUS;
    if (!m->in_bounds) return storage_error(0, i, m);
    t->ptrs[i] = m->data;
    t->numel[i] = m->numel;
    return STATUS_DONE;
}

/* Validates entry i of list l (1 <= l <= 4) against its param. Returns a status or -1. */
static int check_entry(PyObject **items[N_LISTS], int l, Py_ssize_t i, table_t *t) {
    void **slot = &t->ptrs[(size_t)l * t->n + i];
    if (l == 4) return float_buffer(items[4][i], "each state step", (float **)slot) < 0 ? -1 : STATUS_DONE;
    meta_t m;
    const int rc = read_meta(items[l][i], 1, &m);
    if (rc != 0) return rc < 0 ? -1 : STATUS_NEEDS_UNWRAP;
    if (m.device_type != cpu_code) return STATUS_NEEDS_GROUPING;
    if (m.dtype != dtype_codes[t->dtype] || !same_shape(&m, &t->params[i])) {
        PyErr_Format(PyExc_ValueError, "%s[%zd] does not match params[%zd] in dtype or shape", list_names[l], i,
                     i);
        return -1;
    }
    if (!m.contiguous) return STATUS_NEEDS_CONTIGUOUS;
    if (!m.in_bounds) return storage_error(l, i, &m);
    *slot = m.data;
    return STATUS_DONE;
}

/* ---- validation: overlapping tensors ----------------------------------------------------- */

/* Sorts keys (with their tags) ascending: LSD radix sort on bytes, skipping the bytes all
 * keys share. `tmp_keys`/`tmp_tags` are scratch of the same length. */
static void sort_ranges(uint64_t *keys, uint32_t *tags, uint64_t *tmp_keys, uint32_t *tmp_tags, size_t n) {
    size_t counts[8][256];
    memset(counts, 0, sizeof counts);
    for (size_t i = 0; i < n; i++)
        for (int d = 0; d < 8; d++) counts[d][(keys[i] >> (8 * d)) & 0xFF]++;
    uint64_t *src_k = keys, *dst_k = tmp_keys;
    uint32_t *src_t = tags, *dst_t = tmp_tags;
    for (int d = 0; d < 8; d++) {
        if (counts[d][(keys[0] >> (8 * d)) & 0xFF] == n) continue;
        size_t offsets[256], sum = 0;
        for (int b = 0; b < 256; b++) {
            offsets[b] = sum;
            sum += counts[d][b];
        }
        for (size_t i = 0; i < n; i++) {
            const size_t at = offsets[(src_k[i] >> (8 * d)) & 0xFF]++;
            dst_k[at] = src_k[i];
            dst_t[at] = src_t[i];
        }
        uint64_t *k = src_k;
        src_k = dst_k;
        dst_k = k;
        uint32_t *g = src_t;
        src_t = dst_t;
        dst_t = g;
    }
    if (src_k != keys) {
        memcpy(keys, src_k, n * sizeof *keys);
        memcpy(tags, src_t, n * sizeof *tags);
    }
}

/*
 * Whether any two of the params, grads, exp_avgs and exp_avg_sqs share memory (the kernel's
 * threads would write one another's elements). Across params (the same parameter twice in a
 * group, views of one buffer) the table is marked serial; a param overlapping its own grad or
 * state is a ValueError. Grads overlapping only grads are fine: they are only read.
 * Returns 0 or -1.
 */
static int check_overlaps(table_t *t) {
    const Py_ssize_t n = t->n;
    const size_t cap = (size_t)n * 4;
    if ((size_t)n > UINT32_MAX / 4) {
        t->serial = 1; /* too many to tag: take the safe order without looking */
        return 0;
    }
    uint64_t *keys = (uint64_t *)malloc(cap * 2 * sizeof(uint64_t));
    uint32_t *tags = (uint32_t *)malloc(cap * 2 * sizeof(uint32_t));
    if (keys == NULL || tags == NULL) {
        free(keys);
        free(tags);
        PyErr_NoMemory();
        return -1;
    }
    const int64_t itemsize = itemsizes[t->dtype];
    size_t count = 0;
    for (int l = 0; l < 4; l++)
        for (Py_ssize_t i = 0; i < n; i++)
            if (t->numel[i] > 0) {
                keys[count] = (uint64_t)(uintptr_t)t->ptrs[(size_t)l * n + i];
                tags[count++] = (uint32_t)((size_t)l * n + i);
            }
    int rc = 0;
    if (count > 1) {
        sort_ranges(keys, tags, keys + cap, tags + cap, count);
        /* One pass finds whether anything overlaps; only then are the pairs classified. */
        uint64_t reach = 0;
        size_t first_overlap = count;
        for (size_t a = 0; a < count && first_overlap == count; a++) {
            if (a > 0 && keys[a] < reach) first_overlap = a;
            const uint64_t end = keys[a] + (uint64_t)(t->numel[tags[a] % n] * itemsize);
            if (end > reach) reach = end;
        }
        for (size_t a = 0; first_overlap < count && a < count && rc == 0; a++) {
            const uint64_t end = keys[a] + (uint64_t)(t->numel[tags[a] % n] * itemsize);
            for (size_t b = a + 1; b < count && keys[b] < end && rc == 0; b++) {
                const uint32_t la = tags[a] / (uint32_t)n, lb = tags[b] / (uint32_t)n;
                const uint32_t ia = tags[a] % (uint32_t)n, ib = tags[b] % (uint32_t)n;
                if (la == 1 && lb == 1) continue;
                if (ia != ib) {
                    t->serial = 1;
                    continue;
                }
                PyErr_Format(PyExc_ValueError, "%s[%u] and %s[%u] share memory: the step would write one while reading the other",
                             list_names[la < lb ? la : lb], ia, list_names[la < lb ? lb : la], ib);
                rc = -1;
            }
        }
    }
    free(keys);
    free(tags);
    return rc;
}

/*
 * Validates the lists (n > 0 entries each) into `table`, allocated here: params of one
 * kernel dtype, every tensor a contiguous CPU tensor whose storage holds it, of its param's
 * dtype and shape; steps float32 CPU scalars; no memory shared within a param; `seeds`
 * (NULL, or n objects: stochastic rounding) one-element int64 CPU tensors, read before the
 * kernel writes anything. Returns a status (NEEDS_* without an exception) or -1.
 */
static int validate(PyObject **items[N_LISTS], PyObject *const *seeds, Py_ssize_t n, table_t *t) {
    if (table_alloc(t, n) < 0) return -1;
    for (int l = 0; l < N_LISTS; l++) prefetch_tensors(items[l], n);
    for (Py_ssize_t i = 0; i < n; i++) {
        const int status = check_param(items, i, t);
        if (status != STATUS_DONE) return status;
    }
    for (int l = 1; l < N_LISTS; l++) {
        for (Py_ssize_t i = 0; i < n; i++) {
            const int status = check_entry(items, l, i, t);
            if (status != STATUS_DONE) return status;
        }
    }
    if (seeds != NULL) {
        t->seeds = (int64_t **)malloc((size_t)n * sizeof(int64_t *));
        if (t->seeds == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < n; i++)
            if (seed_buffer(seeds[i], i, &t->seeds[i]) < 0) return -1;
    }
    return check_overlaps(t) < 0 ? -1 : STATUS_DONE;
}

/* ---- hyperparameters and the kernel call ------------------------------------------------ */

typedef struct {
    double lr, beta1, beta2, weight_decay, eps, clip_exponent, lr_max;
    int clip_mode, decouple, maximize, nesterov, caution;
} hyper_t;

static int float_arg(PyObject *const *args, int i, double *out) {
    *out = PyFloat_AsDouble(args[i]);
    return *out == -1.0 && PyErr_Occurred() ? -1 : 0;
}

static int int_arg(PyObject *const *args, int i, int *out) {
    const long v = PyLong_AsLong(args[i]);
    *out = (int)v;
    return v == -1 && PyErr_Occurred() ? -1 : 0;
}

static int bool_arg(PyObject *const *args, int i, int *out) {
    *out = PyObject_IsTrue(args[i]);
    return *out < 0 ? -1 : 0;
}

/* Reads lr, beta1, beta2, weight_decay, eps, clip_exponent, clip_mode, decouple, maximize,
 * nesterov, caution, lr_max from args[0..11]. */
static int hyper_args(PyObject *const *args, hyper_t *h) {
    if (float_arg(args, 0, &h->lr) || float_arg(args, 1, &h->beta1) || float_arg(args, 2, &h->beta2) ||
        float_arg(args, 3, &h->weight_decay) || float_arg(args, 4, &h->eps) ||
        float_arg(args, 5, &h->clip_exponent) || int_arg(args, 6, &h->clip_mode) ||
        bool_arg(args, 7, &h->decouple) || bool_arg(args, 8, &h->maximize) ||
        bool_arg(args, 9, &h->nesterov) || bool_arg(args, 10, &h->caution) || float_arg(args, 11, &h->lr_max))
        return -1;
    if (h->clip_mode < ADOPT_CLIP_NONE || h->clip_mode > ADOPT_CLIP_POWER) {
        PyErr_Format(PyExc_ValueError, "unknown clip_mode %d", h->clip_mode);
        return -1;
    }
    return 0;
}

static adopt_cpu_args kernel_args(const table_t *t, const hyper_t *h, const double *clip_table,
                                  const float *grad_scale, const float *found_inf, int num_threads) {
    const size_t n = (size_t)t->n;
    const adopt_cpu_args a = {
        .n_tensors = t->n,
        .p = t->ptrs,
        .g = t->ptrs + n,
        .m = t->ptrs + 2 * n,
        .v = t->ptrs + 3 * n,
        .numel = t->numel,
        .step = (float *const *)(t->ptrs + 4 * n),
        .seed = (const int64_t *const *)t->seeds,
        .dtype = (adopt_dtype)t->dtype,
        .clip_mode = (adopt_clip_mode)h->clip_mode,
        .clip_table = clip_table,
        .clip_exponent = h->clip_exponent,
        .grad_scale = grad_scale,
        .found_inf = found_inf,
        .lr = h->lr,
        .beta1 = h->beta1,
        .beta2 = h->beta2,
        .weight_decay = h->weight_decay,
        .eps = h->eps,
        .decouple = h->decouple,
        .maximize = h->maximize,
        .nesterov = h->nesterov,
        .caution = h->caution,
        .lr_max = h->lr_max,
        .num_threads = t->serial ? 1 : num_threads,
    };
    return a;
}

/* An AMP scalar argument: NULL for None, else its float32 CPU buffer. */
static int amp_scalar(PyObject *t, const char *name, const float **out) {
    *out = NULL;
    return t == Py_None ? 0 : float_buffer(t, name, (float **)out);
}

/* ---- step() -------------------------------------------------------------------------- */

PyDoc_STRVAR(step_doc,
             "step(params, grads, exp_avgs, exp_avg_sqs, state_steps, clip_table, grad_scale,\n"
             "     found_inf, lr, beta1, beta2, weight_decay, eps, clip_exponent, clip_mode,\n"
             "     decouple, maximize, nesterov, caution, lr_max, num_threads, dry_run, seeds) -> int\n\n"
             "One fused ADOPT step over CPU tensors of one dtype (float32/64, float16, "
             "bfloat16).\nReturns DONE, or NEEDS_GROUPING / NEEDS_CONTIGUOUS / NEEDS_UNWRAP without "
             "changing anything.\nclip_mode: CLIP_NONE, CLIP_TABLE (clip_table: float64 tensor, one "
             "threshold per\ntensor) or CLIP_POWER (threshold = step ** clip_exponent). dry_run: "
             "validate only\n(same result, nothing runs). seeds: None (round to nearest) or one int64\n"
             "CPU scalar per tensor: float16/bfloat16 params are written with stochastic rounding.\n"
             "lr_max > 0: corrected weight decay relative to it (0: off).");

/* Positional arguments of step(): 8 objects, 12 hyperparameters, 2 ints, the seeds. */
#define STEP_NARGS 23

/* Snapshots of the 5 lists (new tuples in lists[], their items in items[]), all of one
 * length *n. Runs Python code (iteration). Returns 0 or -1. */
static int snapshot_lists(PyObject *const *args, PyObject *lists[N_LISTS], PyObject **items[N_LISTS],
                          Py_ssize_t *n) {
    for (int l = 0; l < N_LISTS; l++) {
        lists[l] = PySequence_Tuple(args[l]);
        if (lists[l] == NULL) return -1;
        const Py_ssize_t size = PyTuple_GET_SIZE(lists[l]);
        if (l > 0 && size != *n) {
            PyErr_Format(PyExc_ValueError, "%s has %zd entries but params has %zd", list_names[l], size, *n);
            return -1;
        }
        *n = size;
        items[l] = &PyTuple_GET_ITEM(lists[l], 0);
    }
    return 0;
}

/* METH_FASTCALL: no argument tuple is built per call. */
static PyObject *py_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != STEP_NARGS)
        return PyErr_Format(PyExc_TypeError, "step() takes %d positional arguments (%zd given)",
                            STEP_NARGS, nargs);
    PyObject *clip_table = args[5], *grad_scale = args[6], *found_inf = args[7];
    PyObject *lists[N_LISTS] = {NULL, NULL, NULL, NULL, NULL};
    PyObject **items[N_LISTS];
    table_t table = {0, -1, 0, NULL, NULL, NULL, NULL};
    PyObject *result = NULL, *seeds = NULL;
    Py_ssize_t n = 0;
    hyper_t h;
    int num_threads, dry_run;
    /* Phase 1: everything that can run Python code. */
    if (hyper_args(args + 8, &h) || int_arg(args, 20, &num_threads) || bool_arg(args, 21, &dry_run) ||
        snapshot_lists(args, lists, items, &n) < 0 || (!dry_run && n > 0 && bump_versions(lists[0]) < 0))
        goto done;
    if (args[22] != Py_None) {
        seeds = PySequence_Tuple(args[22]);
        if (seeds == NULL) goto done;
        if (PyTuple_GET_SIZE(seeds) != n) {
            PyErr_Format(PyExc_ValueError, "seeds has %zd entries but params has %zd", PyTuple_GET_SIZE(seeds), n);
            goto done;
        }
    }
    if (n == 0) {
        result = PyLong_FromLong(STATUS_DONE);
        goto done;
    }
    for (int l = 0; l < N_LISTS; l++) {
        const int neg = any_neg_view_slow(items[l], n);
        if (neg < 0) goto done;
        if (neg > 0) {
            result = PyLong_FromLong(STATUS_NEEDS_CONTIGUOUS);
            goto done;
        }
    }
    /* Phase 2: no Python code runs from here until the kernel has returned. */
    const int status = validate(items, seeds == NULL ? NULL : &PyTuple_GET_ITEM(seeds, 0), n, &table);
    if (status < 0) goto done;
    if (status != STATUS_DONE) {
        result = PyLong_FromLong(status);
        goto done;
    }
    const double *table_ptr = NULL;
    const float *scale_ptr, *inf_ptr;
    if (h.clip_mode == ADOPT_CLIP_TABLE &&
        buffer_of(clip_table, ADOPT_F64, n, "clip_table", (void **)&table_ptr) < 0)
        goto done;
    if (amp_scalar(grad_scale, "grad_scale", &scale_ptr) || amp_scalar(found_inf, "found_inf", &inf_ptr))
        goto done;
    const adopt_cpu_args a = kernel_args(&table, &h, table_ptr, scale_ptr, inf_ptr, num_threads);
    /* The GIL stays held: another thread could otherwise free or resize a tensor under the
     * kernel. */
    if (!dry_run && adopt_cpu_step(&a) != 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyLong_FromLong(STATUS_DONE);

done:
    table_free(&table);
    Py_XDECREF(seeds);
    for (int l = 0; l < N_LISTS; l++) Py_XDECREF(lists[l]);
    return result;
}

/* ---- step_groups() ----------------------------------------------------------------------- */

/* One param group of step_groups(): its gathered tensors (new references, (N_LISTS + 1) * cap,
 * list l at objs + l * cap, the first n used; list N_LISTS holds the seeds when `rounded`),
 * their validated table, its hyperparameters. */
typedef struct {
    PyObject **objs;
    Py_ssize_t cap, n;
    table_t table;
    hyper_t hyper;
    int rounded; /* stochastic rounding: each state's "seed" is gathered too */
} group_t;

static int gathered_lists(const group_t *g) { return g->rounded ? N_LISTS + 1 : N_LISTS; }

static void group_free(group_t *g) {
    for (int l = 0; l < gathered_lists(g) && g->objs != NULL; l++)
        for (Py_ssize_t i = 0; i < g->n; i++) Py_DECREF(g->objs[l * g->cap + i]);
    free(g->objs);
    g->objs = NULL;
    g->n = 0;
    table_free(&g->table);
}

/*
 * state[p] (borrowed), or NULL with or without an exception. The state dict is normally in
 * parameter order (state is created in that order), so the entry at *pos, the one after the
 * previous parameter's, is tried first: it avoids Tensor.__hash__, a Python function that
 * costs more than the rest of the lookup. An entry whose key is not p falls back to hashing.
 */
static PyObject *state_of(PyObject *state, PyObject *p, Py_ssize_t *pos) {
    PyObject *key, *value;
    Py_ssize_t next = *pos;
    if (PyDict_Next(state, &next, &key, &value) && key == p) {
        *pos = next;
        return value;
    }
    return PyDict_GetItemWithError(state, p);
}

/* p_state[key] as a new reference, or NULL with or without an exception. */
static PyObject *state_entry(PyObject *p_state, PyObject *key) {
    PyObject *value = PyDict_GetItemWithError(p_state, key);
    Py_XINCREF(value);
    return value;
}

/*
 * Phase 1 for one group: the lists ADOPT._init_group builds for `params` (each parameter
 * with a gradient, the gradient and the parameter's exp_avg, exp_avg_sq and step from
 * `state`), as new references, so that Python code run by a lookup (Tensor.__hash__, a
 * __torch_function__ getter, a collection) cannot free what was already gathered.
 * Returns STATUS_DONE, STATUS_DECLINED when a parameter with a gradient has no (complete)
 * state, or -1.
 */
static int gather(PyObject *params, PyObject *state, Py_ssize_t *pos, group_t *g) {
    PyObject *snapshot = PySequence_Tuple(params);
    if (snapshot == NULL) return -1;
    g->cap = PyTuple_GET_SIZE(snapshot);
    g->objs = (PyObject **)malloc(((size_t)g->cap * (N_LISTS + 1) + 1) * sizeof(PyObject *));
    if (g->objs == NULL) {
        Py_DECREF(snapshot);
        PyErr_NoMemory();
        return -1;
    }
    prefetch_tensors(&PyTuple_GET_ITEM(snapshot, 0), g->cap); /* .grad reads each TensorImpl */
    int status = STATUS_DONE;
    for (Py_ssize_t i = 0; i < g->cap && status == STATUS_DONE; i++) {
        PyObject *p = PyTuple_GET_ITEM(snapshot, i);
        PyObject *entry[N_LISTS + 1] = {p, NULL, NULL, NULL, NULL, NULL};
        entry[1] = Py_TYPE(attr_grad)->tp_descr_get(attr_grad, p, (PyObject *)Py_TYPE(p));
        if (entry[1] == NULL) {
            status = -1;
            break;
        }
        if (entry[1] == Py_None) {
            Py_DECREF(entry[1]);
            continue;
        }
        PyObject *p_state = state_of(state, p, pos);
        Py_XINCREF(p_state);
        if (p_state != NULL && PyDict_Check(p_state)) {
            entry[2] = state_entry(p_state, str_exp_avg);
            entry[3] = entry[2] == NULL ? NULL : state_entry(p_state, str_exp_avg_sq);
            entry[4] = entry[3] == NULL ? NULL : state_entry(p_state, str_step);
            if (g->rounded) entry[5] = entry[4] == NULL ? NULL : state_entry(p_state, str_seed);
        }
        Py_XDECREF(p_state);
        const int lists = gathered_lists(g);
        if (entry[lists - 1] == NULL) {
            for (int l = 1; l < lists; l++) Py_XDECREF(entry[l]);
            status = PyErr_Occurred() ? -1 : STATUS_DECLINED;
            break;
        }
        for (int l = 0; l < lists; l++) g->objs[l * g->cap + g->n] = l == 0 ? Py_NewRef(p) : entry[l];
        g->n++;
    }
    Py_DECREF(snapshot);
    return status;
}

PyDoc_STRVAR(step_groups_doc,
             "step_groups(groups, state, grad_scale, found_inf, num_threads) -> int\n\n"
             "One fused step of an optimizer's param groups. Each group is a tuple (params, lr,\n"
             "beta1, beta2, weight_decay, eps, clip_exponent, clip_mode, decouple, maximize,\n"
             "nesterov, caution, lr_max, stochastic_rounding); state maps each param to its dict of exp_avg, exp_avg_sq and\n"
             "step (and seed, with stochastic_rounding). Returns DONE\n"
             "once every group is updated, or DECLINED, having changed nothing, whenever the\n"
             "general path must run instead (a param without state, a tensor this kernel does\n"
             "not take, or any error, which the general path then reports).");

#define GROUP_FIELDS 14

static int gather_group(PyObject *spec, PyObject *state, Py_ssize_t *pos, group_t *g) {
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != GROUP_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "each group must be a tuple of 14 fields");
        return -1;
    }
    PyObject *const *fields = &PyTuple_GET_ITEM(spec, 0);
    if (hyper_args(fields + 1, &g->hyper) < 0 || bool_arg(fields, 13, &g->rounded) < 0) return -1;
    return gather(fields[0], state, pos, g);
}

static int validate_group(group_t *g) {
    if (g->n == 0) return STATUS_DONE;
    PyObject **items[N_LISTS];
    for (int l = 0; l < N_LISTS; l++) items[l] = g->objs + l * g->cap;
    const int status = validate(items, g->rounded ? g->objs + N_LISTS * g->cap : NULL, g->n, &g->table);
    return status == STATUS_DONE || status < 0 ? status : STATUS_DECLINED;
}

/* bump_versions() for the params of every group. STATUS_DONE or -1. */
static int bump_group_params(const group_t *groups, Py_ssize_t n_groups) {
    Py_ssize_t total = 0;
    for (Py_ssize_t k = 0; k < n_groups; k++) total += groups[k].n;
    if (total == 0) return STATUS_DONE;
    PyObject *params = PyTuple_New(total);
    if (params == NULL) return -1;
    Py_ssize_t at = 0;
    for (Py_ssize_t k = 0; k < n_groups; k++)
        for (Py_ssize_t i = 0; i < groups[k].n; i++) PyTuple_SET_ITEM(params, at++, Py_NewRef(groups[k].objs[i]));
    const int rc = bump_versions(params);
    Py_DECREF(params);
    return rc < 0 ? -1 : STATUS_DONE;
}

static PyObject *py_step_groups(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5)
        return PyErr_Format(PyExc_TypeError, "step_groups() takes 5 positional arguments (%zd given)", nargs);
    PyObject *state = args[1];
    int num_threads;
    if (!PyDict_Check(state)) return PyErr_Format(PyExc_TypeError, "state must be a dict");
    if (int_arg(args, 4, &num_threads) < 0) return NULL;
    PyObject *specs = PySequence_Tuple(args[0]);
    if (specs == NULL) return NULL;
    const Py_ssize_t n_groups = PyTuple_GET_SIZE(specs);
    group_t *groups = (group_t *)calloc((size_t)n_groups + 1, sizeof(group_t));
    int status = groups == NULL ? -1 : STATUS_DONE;
    if (groups == NULL) PyErr_NoMemory();
    /* Phase 1: every group's objects, before any tensor is looked at. */
    Py_ssize_t pos = 0;
    for (Py_ssize_t k = 0; k < n_groups && status == STATUS_DONE; k++)
        status = gather_group(PyTuple_GET_ITEM(specs, k), state, &pos, &groups[k]);
    for (Py_ssize_t k = 0; k < n_groups && status == STATUS_DONE; k++)
        for (int l = 0; l < N_LISTS && status == STATUS_DONE; l++) {
            const int neg = any_neg_view_slow(groups[k].objs + l * groups[k].cap, groups[k].n);
            status = neg < 0 ? -1 : neg > 0 ? STATUS_DECLINED : STATUS_DONE;
        }
    if (status == STATUS_DONE) status = bump_group_params(groups, n_groups);
    /* Phase 2: no Python code runs from here until the last kernel has returned. Every group
     * is validated before any runs. */
    for (Py_ssize_t k = 0; k < n_groups && status == STATUS_DONE; k++) status = validate_group(&groups[k]);
    const float *scale_ptr = NULL, *inf_ptr = NULL;
    if (status == STATUS_DONE &&
        (amp_scalar(args[2], "grad_scale", &scale_ptr) || amp_scalar(args[3], "found_inf", &inf_ptr)))
        status = -1;
    if (status < 0 && PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear(); /* the general path raises it again, with its own message */
        status = STATUS_DECLINED;
    }
    int rc = 0;
    for (Py_ssize_t k = 0; status == STATUS_DONE && k < n_groups && rc == 0; k++) {
        if (groups[k].n == 0) continue;
        const adopt_cpu_args a =
            kernel_args(&groups[k].table, &groups[k].hyper, NULL, scale_ptr, inf_ptr, num_threads);
        rc = adopt_cpu_step(&a);
    }
    for (Py_ssize_t k = 0; groups != NULL && k < n_groups; k++) group_free(&groups[k]);
    free(groups);
    Py_DECREF(specs);
    if (rc != 0) return PyErr_NoMemory();
    return status < 0 ? NULL : PyLong_FromLong(status);
}

/* ---- step_state(): low-memory optimizer state ----------------------------------------- */

PyDoc_STRVAR(step_state_doc,
             "step_state(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales, exp_avg_sq_scales,\n"
             "           state_steps, seeds, clip_table, grad_scale, found_inf, fmt, lr, beta1, beta2,\n"
             "           weight_decay, eps, clip_exponent, clip_mode, decouple, maximize, nesterov,\n"
             "           caution, lr_max, stochastic_rounding, num_threads, dry_run) -> None\n\n"
             "One fused ADOPT step over CPU params of one dtype (float32, float16, bfloat16) whose\n"
             "moments are stored in a low-memory format (adopt/_state_formats.py): fmt STATE_BF16\n"
             "(exp_avgs / exp_avg_sqs bfloat16 tensors of the params' sizes; the scale lists None)\n"
             "or STATE_8BIT (uint8 codes of the params' sizes and float32 scales of ceil(numel / 256)\n"
             "elements). seeds: one int64 CPU scalar per tensor (the moments' rounding keys; with\n"
             "stochastic_rounding the 16-bit params' too). Every tensor is checked before anything is\n"
             "written: a ValueError or TypeError names the list and index of the first one that is\n"
             "not right. dry_run: check only.");

#define STATE_NARGS 27
#define N_STATE_LISTS 8 /* params, grads, exp_avgs, exp_avg_sqs, the two scale lists, steps, seeds */

static const char *const state_list_names[N_STATE_LISTS] = {
    "params", "grads", "exp_avgs", "exp_avg_sqs", "exp_avg_scales", "exp_avg_sq_scales", "state_steps", "seeds"};
/* Whether the step writes a list's tensors (the others are only read). */
static const int state_list_written[N_STATE_LISTS] = {1, 0, 1, 1, 1, 1, 1, 0};

/* Reads x (entry i of list l) and checks it is a contiguous CPU tensor of dtype `dtype`
 * (named dtype_name) with `numel` elements whose storage holds them. 0 or -1. */
static int state_tensor(PyObject *x, int l, Py_ssize_t i, int32_t dtype, const char *dtype_name, int64_t numel,
                        meta_t *m) {
    const int rc = read_meta(x, 1, m);
    if (rc < 0) return -1;
    const char *name = state_list_names[l];
    if (rc > 0) {
        PyErr_Format(PyExc_TypeError,
                     "%s[%zd] must be a plain strided tensor whose memory the CPU kernel can read, got %s", name,
                     i, Py_TYPE(x)->tp_name);
        return -1;
    }
    if (m->device_type != cpu_code) {
        PyErr_Format(PyExc_ValueError, "%s[%zd] is not a CPU tensor", name, i);
        return -1;
    }
    if (m->dtype != dtype) {
        PyErr_Format(PyExc_ValueError, "%s[%zd] must be a %s tensor", name, i, dtype_name);
        return -1;
    }
    if (m->numel != numel) {
        PyErr_Format(PyExc_ValueError, "%s[%zd] has %lld element(s), expected %lld", name, i, (long long)m->numel,
                     (long long)numel);
        return -1;
    }
    if (!m->contiguous) {
        PyErr_Format(PyExc_ValueError, "%s[%zd] must be contiguous (and not a negated view)", name, i);
        return -1;
    }
    if (!m->in_bounds) return storage_error_named(name, i, m);
    return 0;
}

typedef struct {
    uint64_t start, end;
    uint32_t list;
    Py_ssize_t index;
} state_range_t;

static int compare_ranges(const void *x, const void *y) {
    const state_range_t *a = (const state_range_t *)x, *b = (const state_range_t *)y;
    return a->start < b->start ? -1 : a->start > b->start ? 1 : 0;
}

/* ValueError when two tensors share memory and the step writes at least one of them. */
static int state_overlaps(state_range_t *r, size_t count) {
    if (count < 2) return 0;
    qsort(r, count, sizeof *r, compare_ranges);
    for (size_t a = 0; a < count; a++) {
        for (size_t b = a + 1; b < count && r[b].start < r[a].end; b++) {
            if (!state_list_written[r[a].list] && !state_list_written[r[b].list]) continue;
            PyErr_Format(PyExc_ValueError, "%s[%zd] and %s[%zd] share memory: the step would write one while reading the other",
                         state_list_names[r[a].list], r[a].index, state_list_names[r[b].list], r[b].index);
            return -1;
        }
    }
    return 0;
}

static PyObject *py_step_state(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != STATE_NARGS)
        return PyErr_Format(PyExc_TypeError, "step_state() takes %d positional arguments (%zd given)", STATE_NARGS,
                            nargs);
    PyObject *lists[N_STATE_LISTS] = {NULL};
    PyObject **items[N_STATE_LISTS] = {NULL};
    PyObject *result = NULL;
    void **ptrs = NULL;
    int64_t *numel = NULL;
    state_range_t *ranges = NULL;
    Py_ssize_t n = 0;
    hyper_t h;
    int fmt, sr, num_threads, dry_run;
    /* Phase 1: everything that can run Python code. */
    if (int_arg(args, 11, &fmt) || hyper_args(args + 12, &h) || bool_arg(args, 24, &sr) ||
        int_arg(args, 25, &num_threads) || bool_arg(args, 26, &dry_run))
        goto done;
    if (fmt != ADOPT_STATE_BF16 && fmt != ADOPT_STATE_8BIT) {
        PyErr_Format(PyExc_ValueError, "unknown state format %d", fmt);
        goto done;
    }
    const int fmt8 = fmt == ADOPT_STATE_8BIT;
    static const int arg_of_list[N_STATE_LISTS] = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int l = 0; l < N_STATE_LISTS; l++) {
        PyObject *arg = args[arg_of_list[l]];
        if ((l == 4 || l == 5) && !fmt8) {
            if (arg != Py_None) {
                PyErr_Format(PyExc_ValueError, "%s must be None for bfloat16 state", state_list_names[l]);
                goto done;
            }
            continue;
        }
        lists[l] = PySequence_Tuple(arg);
        if (lists[l] == NULL) goto done;
        const Py_ssize_t size = PyTuple_GET_SIZE(lists[l]);
        if (l > 0 && size != n) {
            PyErr_Format(PyExc_ValueError, "%s has %zd entries but params has %zd", state_list_names[l], size, n);
            goto done;
        }
        n = l == 0 ? size : n;
        items[l] = &PyTuple_GET_ITEM(lists[l], 0);
    }
    if (n == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    for (int l = 0; l < 4; l++) {
        const int neg = any_neg_view_slow(items[l], n);
        if (neg < 0) goto done;
        if (neg > 0) {
            PyErr_Format(PyExc_ValueError, "%s holds a negated view (resolve_neg() it first)", state_list_names[l]);
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (!PyObject_TypeCheck(items[0][i], tensor_base_type)) {
            PyErr_Format(PyExc_TypeError, "params[%zd] must be a tensor, got %s", i, Py_TYPE(items[0][i])->tp_name);
            goto done;
        }
    if (!dry_run && bump_versions(lists[0]) < 0) goto done;

    /* Phase 2: no Python code runs from here until the kernel has returned. */
    ptrs = (void **)calloc((size_t)n * N_STATE_LISTS, sizeof(void *));
    numel = (int64_t *)malloc((size_t)n * sizeof(int64_t));
    ranges = (state_range_t *)malloc((size_t)n * N_STATE_LISTS * sizeof(state_range_t));
    if (ptrs == NULL || numel == NULL || ranges == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int dtype = -1;
    size_t count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        meta_t pm, m;
        const int rc = read_meta(items[0][i], 1, &pm);
        if (rc < 0) goto done;
        const int k = rc == 0 ? dtype_index(pm.dtype) : N_DTYPES;
        if (rc > 0 || k == N_DTYPES || k == ADOPT_F64) {
            PyErr_Format(PyExc_TypeError, "params[%zd] must be a float32, float16 or bfloat16 tensor the CPU kernel can read", i);
            goto done;
        }
        if (dtype < 0) dtype = k;
        if (k != dtype) {
            PyErr_Format(PyExc_ValueError, "params[%zd] has another dtype than params[0]: one call updates one dtype", i);
            goto done;
        }
        if (state_tensor(items[0][i], 0, i, pm.dtype, "float32/float16/bfloat16", pm.numel, &pm) < 0) goto done;
        const int64_t elements = pm.numel, blocks = (elements + ADOPT_STATE_BLOCK - 1) / ADOPT_STATE_BLOCK;
        numel[i] = elements;
        ptrs[i] = pm.data;
        static const char *const names[N_DTYPES] = {"float32", "float64", "float16", "bfloat16"};
        if (state_tensor(items[1][i], 1, i, pm.dtype, names[k], elements, &m) < 0) goto done;
        if (!same_shape(&m, &pm)) {
            PyErr_Format(PyExc_ValueError, "grads[%zd] does not match params[%zd] in shape", i, i);
            goto done;
        }
        ptrs[(size_t)n + i] = m.data;
        const int32_t moment_dtype = fmt8 ? uint8_code : dtype_codes[ADOPT_BF16];
        const char *moment_name = fmt8 ? "uint8" : "bfloat16";
        for (int l = 2; l < 4; l++) {
            if (state_tensor(items[l][i], l, i, moment_dtype, moment_name, elements, &m) < 0) goto done;
            ptrs[(size_t)l * n + i] = m.data;
        }
        for (int l = 4; fmt8 && l < 6; l++) {
            if (state_tensor(items[l][i], l, i, dtype_codes[ADOPT_F32], "float32", blocks, &m) < 0) goto done;
            ptrs[(size_t)l * n + i] = m.data;
        }
        if (state_tensor(items[6][i], 6, i, dtype_codes[ADOPT_F32], "float32", 1, &m) < 0) goto done;
        ptrs[(size_t)6 * n + i] = m.data;
        if (state_tensor(items[7][i], 7, i, int64_code, "int64", 1, &m) < 0) goto done;
        ptrs[(size_t)7 * n + i] = m.data;
        const int64_t bytes[N_STATE_LISTS] = {elements * itemsizes[k], elements * itemsizes[k],
                                              elements * (fmt8 ? 1 : 2), elements * (fmt8 ? 1 : 2),
                                              blocks * 4, blocks * 4, 4, 8};
        for (int l = 0; l < N_STATE_LISTS; l++) {
            if ((l == 4 || l == 5) && !fmt8) continue;
            if (bytes[l] == 0) continue;
            const uint64_t start = (uint64_t)(uintptr_t)ptrs[(size_t)l * n + i];
            ranges[count++] = (state_range_t){start, start + (uint64_t)bytes[l], (uint32_t)l, i};
        }
    }
    if (state_overlaps(ranges, count) < 0) goto done;
    const double *table_ptr = NULL;
    const float *scale_ptr, *inf_ptr;
    if (h.clip_mode == ADOPT_CLIP_TABLE && buffer_of(args[8], ADOPT_F64, n, "clip_table", (void **)&table_ptr) < 0)
        goto done;
    if (amp_scalar(args[9], "grad_scale", &scale_ptr) || amp_scalar(args[10], "found_inf", &inf_ptr)) goto done;
    if (!dry_run) {
        table_t t = {n, dtype, 0, ptrs, numel, NULL, (int64_t **)(ptrs + (size_t)7 * n)};
        /* kernel_args reads params, grads, moments, steps from list-major ptrs: steps are list 4
         * there, list 6 here. */
        adopt_cpu_args base = kernel_args(&t, &h, table_ptr, scale_ptr, inf_ptr, num_threads);
        base.step = (float *const *)(ptrs + (size_t)6 * n);
        const adopt_state_args a = {
            .base = base,
            .format = (adopt_state_format)fmt,
            .m_scale = fmt8 ? (float *const *)(ptrs + (size_t)4 * n) : NULL,
            .v_scale = fmt8 ? (float *const *)(ptrs + (size_t)5 * n) : NULL,
            .param_sr = sr,
        };
        if (adopt_cpu_state_step(&a) != 0) {
            PyErr_NoMemory();
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    free(ptrs);
    free(numel);
    free(ranges);
    for (int l = 0; l < N_STATE_LISTS; l++) Py_XDECREF(lists[l]);
    return result;
}

/* ---- check_lists() ----------------------------------------------------------------------- */

PyDoc_STRVAR(check_lists_doc,
             "check_lists(params, grads, exp_avgs, exp_avg_sqs, state_steps) -> int\n\n"
             "-1 when every grad, exp_avg and exp_avg_sq is a strided tensor of its param's shape,\n"
             "dtype and device, every step a one-element tensor, and every storage holds its\n"
             "tensor's elements; else the index of the first\n"
             "param this cannot confirm (a mismatch, or a tensor it cannot read such as a DTensor),\n"
             "from which the caller checks on. Tensors on any device; no data is read.");

static PyObject *py_check_lists(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != N_LISTS)
        return PyErr_Format(PyExc_TypeError, "check_lists() takes %d positional arguments (%zd given)", N_LISTS,
                            nargs);
    PyObject *lists[N_LISTS] = {NULL, NULL, NULL, NULL, NULL};
    PyObject **items[N_LISTS];
    Py_ssize_t n = 0, first = -1;
    if (snapshot_lists(args, lists, items, &n) < 0) {
        for (int l = 0; l < N_LISTS; l++) Py_XDECREF(lists[l]);
        return NULL;
    }
    for (int l = 0; l < N_LISTS; l++) prefetch_tensors(items[l], n);
    for (Py_ssize_t i = 0; i < n && first < 0; i++) {
        meta_t p, m;
        int ok = read_meta(items[0][i], 0, &p) == 0 && p.in_bounds;
        for (int l = 1; ok && l < 4; l++)
            ok = read_meta(items[l][i], 0, &m) == 0 && m.in_bounds && m.dtype == p.dtype &&
                 m.device_type == p.device_type && m.device_index == p.device_index && same_shape(&m, &p);
        ok = ok && read_meta(items[4][i], 0, &m) == 0 && m.in_bounds && m.numel == 1;
        if (!ok) first = i;
    }
    for (int l = 0; l < N_LISTS; l++) Py_DECREF(lists[l]);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromSsize_t(first);
}

/* ---- host_steps(), has_openmp() ------------------------------------------------------------ */

PyDoc_STRVAR(host_steps_doc,
             "host_steps(state_steps) -> list[int] | None\n\n"
             "The step counts as ints, or None unless every step is a float32 CPU scalar.");

static PyObject *py_host_steps(PyObject *self, PyObject *steps) {
    (void)self;
    PyObject *snapshot = PySequence_Tuple(steps);
    if (snapshot == NULL) return NULL;
    const Py_ssize_t n = PyTuple_GET_SIZE(snapshot);
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        float *ptr;
        if (float_buffer(PyTuple_GET_ITEM(snapshot, i), "each state step", &ptr) < 0) {
            Py_CLEAR(out);
            if (PyErr_ExceptionMatches(PyExc_ValueError)) {
                PyErr_Clear();
                out = Py_NewRef(Py_None);
            }
            break;
        }
        PyObject *v = PyLong_FromLongLong((long long)*ptr);
        if (v == NULL) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, v);
    }
    Py_DECREF(snapshot);
    return out;
}

/* ---- the kernel's random bits and rounding, for tests ------------------------------------ */

static PyObject *py_random_draw(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) return PyErr_Format(PyExc_TypeError, "random_draw() takes 3 arguments (%zd given)", nargs);
    const long long seed = PyLong_AsLongLong(args[0]);
    const unsigned long step = PyLong_AsUnsignedLongMask(args[1]);
    const long long index = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (index < 0) return PyErr_Format(PyExc_ValueError, "random_draw(): index must be >= 0, got %lld", index);
    return PyLong_FromUnsignedLong(adopt_random_draw(seed, (uint32_t)step, index));
}

static PyObject *py_round_stochastic(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) return PyErr_Format(PyExc_TypeError, "round_stochastic() takes 3 arguments (%zd given)", nargs);
    const double x = PyFloat_AsDouble(args[0]);
    const unsigned long r = PyLong_AsUnsignedLong(args[1]);
    const int half = PyObject_IsTrue(args[2]);
    if (PyErr_Occurred() || half < 0) return NULL;
    if (r > 0xFFFFu) return PyErr_Format(PyExc_ValueError, "round_stochastic(): draw must be in [0, 65536), got %lu", r);
    const uint16_t out = half ? adopt_f16_round_stochastic((float)x, (uint32_t)r)
                              : adopt_bf16_round_stochastic((float)x, (uint32_t)r);
    return PyLong_FromLong(out);
}

static PyObject *py_has_openmp(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyBool_FromLong(adopt_cpu_has_openmp());
}

static PyObject *py_avx512_available(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyBool_FromLong(adopt_cpu_avx512_available());
}

static PyObject *py_use_avx512(PyObject *self, PyObject *on) {
    (void)self;
    const int flag = PyObject_IsTrue(on);
    if (flag < 0) return NULL;
    return PyBool_FromLong(adopt_cpu_use_avx512(flag));
}

static PyObject *py_neg_view_detection(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyUnicode_FromString(neg_word >= 0 ? "bit" : "is_neg");
}

static PyObject *py_tensor_access(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyUnicode_FromString(access_mode == ACCESS_INLINE ? "inline" : "cdata");
}

static PyMethodDef methods[] = {
    {"step", (PyCFunction)(void (*)(void))py_step, METH_FASTCALL, step_doc},
    {"step_state", (PyCFunction)(void (*)(void))py_step_state, METH_FASTCALL, step_state_doc},
    {"step_groups", (PyCFunction)(void (*)(void))py_step_groups, METH_FASTCALL, step_groups_doc},
    {"check_lists", (PyCFunction)(void (*)(void))py_check_lists, METH_FASTCALL, check_lists_doc},
    {"host_steps", py_host_steps, METH_O, host_steps_doc},
    {"has_openmp", py_has_openmp, METH_NOARGS, "Whether the kernel was built with OpenMP."},
    {"avx512_available", py_avx512_available, METH_NOARGS,
     "Whether the AVX-512 version of the common low-memory-state step is built in and this CPU runs it."},
    {"use_avx512", py_use_avx512, METH_O,
     "use_avx512(on) -> bool: turn the AVX-512 low-memory-state step on or off (the portable loops,\n"
     "same results; for tests and benchmarks); returns the previous setting."},
    {"random_draw", (PyCFunction)(void (*)(void))py_random_draw, METH_FASTCALL,
     "random_draw(seed, step, index) -> int: the kernel's 16-bit random draw of one element."},
    {"round_stochastic", (PyCFunction)(void (*)(void))py_round_stochastic, METH_FASTCALL,
     "round_stochastic(x, draw, float16) -> int: the kernel's stochastic rounding of float32 x to\n"
     "bfloat16 (float16=False) or float16 bits."},
    {"neg_view_detection", py_neg_view_detection, METH_NOARGS,
     "How negated views are recognised: 'bit' (a flag found in the TensorImpl at import) or 'is_neg'."},
    {"tensor_access", py_tensor_access, METH_NOARGS,
     "How tensor metadata is reached: 'inline' (the at::Tensor in the Python object) or 'cdata'."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_adopt_cpu",
    .m_doc = "Fused ADOPT step for CPU tensors (C, OpenMP).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__adopt_cpu(void) {
    PyObject *torch = PyImport_ImportModule("torch");
    if (torch == NULL) return NULL;
    PyObject *c = PyObject_GetAttrString(torch, "_C");
    PyObject *base = c == NULL ? NULL : PyObject_GetAttrString(c, "TensorBase");
    disabled_dispatch = c == NULL ? NULL : PyObject_GetAttrString(c, "_disabled_torch_dispatch_impl");
    increment_version = c == NULL ? NULL : PyObject_GetAttrString(c, "_increment_version");
    Py_XDECREF(c);
    int ok = base != NULL && disabled_dispatch != NULL && increment_version != NULL && PyType_Check(base) &&
             (str_torch_dispatch = PyUnicode_InternFromString("__torch_dispatch__")) != NULL &&
             (attr_grad = PyObject_GetAttrString(base, "grad")) != NULL &&
             (attr_cdata = PyObject_GetAttrString(base, "_cdata")) != NULL &&
             (str_exp_avg = PyUnicode_InternFromString("exp_avg")) != NULL &&
             (str_exp_avg_sq = PyUnicode_InternFromString("exp_avg_sq")) != NULL &&
             (str_step = PyUnicode_InternFromString("step")) != NULL &&
             (str_seed = PyUnicode_InternFromString("seed")) != NULL &&
             (str_is_neg = PyUnicode_InternFromString("is_neg")) != NULL;
    if (ok) tensor_base_type = (PyTypeObject *)Py_NewRef(base);
    Py_XDECREF(base);
    ok = ok && bind_shim(torch) == 0 && choose_access(torch) == 0;
    Py_DECREF(torch);
    if (!ok) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ImportError, "torch has no TensorBase");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "DONE", STATUS_DONE) ||
        PyModule_AddIntConstant(m, "NEEDS_GROUPING", STATUS_NEEDS_GROUPING) ||
        PyModule_AddIntConstant(m, "NEEDS_CONTIGUOUS", STATUS_NEEDS_CONTIGUOUS) ||
        PyModule_AddIntConstant(m, "NEEDS_UNWRAP", STATUS_NEEDS_UNWRAP) ||
        PyModule_AddIntConstant(m, "DECLINED", STATUS_DECLINED) ||
        PyModule_AddIntConstant(m, "CLIP_NONE", ADOPT_CLIP_NONE) ||
        PyModule_AddIntConstant(m, "CLIP_TABLE", ADOPT_CLIP_TABLE) ||
        PyModule_AddIntConstant(m, "CLIP_POWER", ADOPT_CLIP_POWER) ||
        PyModule_AddIntConstant(m, "STATE_BF16", ADOPT_STATE_BF16) ||
        PyModule_AddIntConstant(m, "STATE_8BIT", ADOPT_STATE_8BIT) ||
        PyModule_AddIntConstant(m, "STATE_BLOCK", ADOPT_STATE_BLOCK)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
