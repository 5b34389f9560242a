/*
 * CPython binding of the fused CPU kernel: adopt._kernels._adopt_cpu.
 *
 * Two entry points share one validation:
 * - step() takes the tensor lists of the functional API;
 * - step_groups() takes an optimizer's param groups and state dict and gathers the lists
 *   itself, for ADOPT.step()'s steady state (every parameter with a gradient has state).
 *   It never reports a problem: whenever anything needs the general path (no state yet, a
 *   tensor it cannot read, an error to raise) it declines, having changed nothing.
 *
 * Each tensor's data pointer, size, dtype, device and contiguity are read through the
 * tensor's own Python attributes, so the module needs no PyTorch headers. Everything is
 * validated before the kernel runs: a call either changes nothing (it raises, declines, or
 * returns a status asking the caller to regroup or to make tensors contiguous) or runs the
 * whole step.
 *
 * Fixed cost: a full validation is about 25 attribute reads per parameter. A small cache
 * of "plans" remembers, per list of tensors, weak references to the 5n tensors with the
 * data pointer and byte size each had when validated; when the same objects come back with
 * the same pointers (every ordinary training step) only the pointers are re-read; a tensor
 * that changed (a new gradient after zero_grad(set_to_none=True)) is validated on its own.
 * Anything that could make the recorded memory unsafe to use (.data = ..., set_, a
 * storage resize, a new state tensor) changes the object or the pointer and triggers a
 * validation. Weak references keep no tensor alive.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdlib.h>
#include <string.h>

#include "adopt_cpu.h"

/* Status codes returned by step(). */
#define STATUS_DONE 0
#define STATUS_NEEDS_GROUPING 1   /* params of several dtypes or a tensor off the CPU */
#define STATUS_NEEDS_CONTIGUOUS 2 /* some tensor is not contiguous */
#define STATUS_NEEDS_UNWRAP 3     /* a tensor subclass that wraps others (DTensor, ...) */
#define STATUS_DECLINED 4         /* step_groups(): the general path must run this step */

#define N_LISTS 5 /* params, grads, exp_avgs, exp_avg_sqs, state_steps */
#define N_PLANS 8

/* torch._C.TensorBase's own descriptors, called directly: no per-call attribute lookup,
 * and a TypeError for anything that is not a tensor. */
static PyObject *attr_data_ptr, *attr_is_contiguous; /* method descriptors */
static PyObject *attr_nbytes, *attr_dtype, *attr_is_cpu, *attr_grad; /* getset descriptors */
/* The keys of a parameter's state dict. */
static PyObject *str_exp_avg, *str_exp_avg_sq, *str_step;
/* torch.Tensor, torch.nn.Parameter, and what __torch_dispatch__ is on every tensor type
 * that owns its memory (wrapper subclasses such as DTensor override it). */
static PyObject *tensor_type, *parameter_type, *disabled_dispatch, *str_torch_dispatch;
/* torch.float32, torch.float64, torch.float16, torch.bfloat16 in adopt_dtype order. */
static PyObject *torch_dtypes[4];
static const int64_t itemsizes[4] = {4, 8, 2, 2};
static const char *const list_names[N_LISTS] = {"params", "grads", "exp_avgs", "exp_avg_sqs",
                                                "state_steps"};

/* ---- attribute helpers (each returns -1 with an exception set on failure) ------------ */

static int truth(PyObject *r) {
    if (r == NULL) return -1;
    const int v = PyObject_IsTrue(r);
    Py_DECREF(r);
    return v;
}

static PyObject *get(PyObject *getset, PyObject *t) {
    return Py_TYPE(getset)->tp_descr_get(getset, t, (PyObject *)Py_TYPE(t));
}

static PyObject *call(PyObject *method, PyObject *t) {
    return PyObject_Vectorcall(method, &t, 1, NULL);
}

static int is_cpu(PyObject *t) { return truth(get(attr_is_cpu, t)); }

static int is_contiguous(PyObject *t) { return truth(call(attr_is_contiguous, t)); }

static int nbytes_of(PyObject *t, int64_t *out) {
    PyObject *r = get(attr_nbytes, t);
    if (r == NULL) return -1;
    *out = PyLong_AsSsize_t(r);
    Py_DECREF(r);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* TensorBase.data_ptr's C function, called without the method-call machinery: a step
 * reads one pointer per tensor, 1000 for 200 parameters, so ~10% per read matters. */
static PyCFunction data_ptr_function;

static int data_ptr_of(PyObject *t, void **out) {
    PyObject *r = data_ptr_function != NULL && PyObject_TypeCheck(t, (PyTypeObject *)tensor_type)
                      ? data_ptr_function(t, NULL)
                      : call(attr_data_ptr, t);
    if (r == NULL) return -1;
    *out = PyLong_AsVoidPtr(r);
    Py_DECREF(r);
    return *out == NULL && PyErr_Occurred() ? -1 : 0;
}

/*
 * 1 when x is a tensor whose data pointer is its own memory: torch.Tensor, nn.Parameter or a
 * subclass that does not override __torch_dispatch__. 0 otherwise (a wrapper subclass such
 * as DTensor, whose data_ptr() is not the data, or not a tensor); -1 on error.
 */
static int plain_tensor(PyObject *x) {
    PyObject *tp = (PyObject *)Py_TYPE(x);
    if (tp == tensor_type || tp == parameter_type) return 1;
    if (!PyObject_TypeCheck(x, (PyTypeObject *)tensor_type)) return 0;
    PyObject *dispatch = PyObject_GetAttr(tp, str_torch_dispatch);
    if (dispatch == NULL) return -1;
    const int plain = dispatch == disabled_dispatch;
    Py_DECREF(dispatch);
    return plain;
}

/* Index of the tensor's dtype in torch_dtypes, 4 if unsupported. */
static int dtype_index(PyObject *t) {
    PyObject *d = get(attr_dtype, t);
    if (d == NULL) return -1;
    int k = 0;
    while (k < 4 && d != torch_dtypes[k]) k++;
    Py_DECREF(d);
    return k;
}

/* Pointer of a contiguous CPU tensor of dtype index `k` with `count` elements, else
 * ValueError. */
static int buffer_of(PyObject *t, int k, int64_t count, const char *name, void **out) {
    const int plain = plain_tensor(t);
    if (plain < 0) return -1;
    const int cpu = plain ? is_cpu(t) : 0;
    if (cpu < 0) return -1;
    const int kt = dtype_index(t);
    if (kt < 0) return -1;
    int64_t nbytes;
    if (nbytes_of(t, &nbytes) < 0) return -1;
    const int ok = plain && cpu && kt == k && nbytes == itemsizes[k] * count ? is_contiguous(t) : 0;
    if (ok < 0) return -1;
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "%s must be a contiguous %s CPU tensor with %lld element(s)",
                     name, k == ADOPT_F32 ? "float32" : "float64", (long long)count);
        return -1;
    }
    return data_ptr_of(t, out);
}

static int float_buffer(PyObject *t, const char *name, float **out) {
    return buffer_of(t, ADOPT_F32, 1, name, (void **)out);
}

/* ---- the per-call table ---------------------------------------------------------------- */

typedef struct {
    Py_ssize_t n;
    int dtype;
    void **ptrs;     /* N_LISTS * n data pointers, list-major */
    int64_t *nbytes; /* 4 * n byte sizes of params, grads, exp_avgs, exp_avg_sqs, then */
    int64_t *numel;  /* n element counts (same allocation) */
} table_t;

static int table_alloc(table_t *t, Py_ssize_t n) {
    t->n = n;
    t->dtype = -1;
    t->ptrs = (void **)malloc((size_t)n * N_LISTS * sizeof(void *));
    t->nbytes = (int64_t *)malloc((size_t)n * 5 * sizeof(int64_t));
    t->numel = t->nbytes == NULL ? NULL : t->nbytes + 4 * (size_t)n;
    if (t->ptrs == NULL || t->nbytes == NULL) {
        free(t->ptrs);
        free(t->nbytes);
        t->ptrs = NULL;
        t->nbytes = NULL;
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void table_free(table_t *t) {
    free(t->ptrs);
    free(t->nbytes);
    t->ptrs = NULL;
    t->nbytes = NULL;
    t->n = 0;
}

/*
 * Validates entry i of list l (l >= 1) against its param (dtype index and byte size taken
 * from the table) and records its pointer and size. Returns a status or -1.
 */
static int check_entry(PyObject **items[N_LISTS], int l, Py_ssize_t i, table_t *t) {
    const size_t j = (size_t)l * t->n + i;
    PyObject *x = items[l][i];
    const int plain = plain_tensor(x);
    if (plain <= 0) return plain < 0 ? -1 : STATUS_NEEDS_UNWRAP;
    if (l == 4) return float_buffer(x, "each state step", (float **)&t->ptrs[j]) < 0 ? -1 : STATUS_DONE;
    const int cpu = is_cpu(x);
    if (cpu < 0) return -1;
    if (!cpu) return STATUS_NEEDS_GROUPING;
    const int k = dtype_index(x);
    if (k < 0) return -1;
    if (nbytes_of(x, &t->nbytes[j]) < 0) return -1;
    if (k != t->dtype || t->nbytes[j] != t->nbytes[i]) {
        PyErr_Format(PyExc_ValueError, "%s[%zd] does not match params[%zd] in dtype or size",
                     list_names[l], i, i);
        return -1;
    }
    const int contiguous = is_contiguous(x);
    if (contiguous < 0) return -1;
    if (!contiguous) return STATUS_NEEDS_CONTIGUOUS;
    return data_ptr_of(x, &t->ptrs[j]) < 0 ? -1 : STATUS_DONE;
}

/*
 * Full validation of all lists into `t`: params of one supported dtype, every tensor on
 * the CPU, contiguous, of its param's dtype and size; steps contiguous float32 CPU
 * scalars. Returns a status or -1.
 */
static int validate(PyObject **items[N_LISTS], table_t *t) {
    const Py_ssize_t n = t->n;
    t->dtype = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = items[0][i];
        const int plain = plain_tensor(p);
        if (plain <= 0) return plain < 0 ? -1 : STATUS_NEEDS_UNWRAP;
        const int k = dtype_index(p);
        if (k < 0) return -1;
        if (t->dtype < 0) {
            if (k == 4) {
                PyErr_Format(PyExc_TypeError,
                             "params[%zd]: the fused CPU kernel supports float64, float32, "
                             "float16 and bfloat16 tensors",
                             i);
                return -1;
            }
            t->dtype = k;
        } else if (k != t->dtype) {
            return STATUS_NEEDS_GROUPING;
        }
        const int cpu = is_cpu(p);
        if (cpu < 0) return -1;
        if (!cpu) return STATUS_NEEDS_GROUPING;
        if (nbytes_of(p, &t->nbytes[i]) < 0) return -1;
        t->numel[i] = t->nbytes[i] / itemsizes[k];
        const int contiguous = is_contiguous(p);
        if (contiguous < 0) return -1;
        if (!contiguous) return STATUS_NEEDS_CONTIGUOUS;
        if (data_ptr_of(p, &t->ptrs[i]) < 0) return -1;
    }
    for (int l = 1; l < N_LISTS; l++) {
        for (Py_ssize_t i = 0; i < n; i++) {
            const int status = check_entry(items, l, i, t);
            if (status != STATUS_DONE) return status;
        }
    }
    return STATUS_DONE;
}

/* ---- plan cache ---------------------------------------------------------------------- */

typedef struct {
    table_t table;   /* table.n == 0: empty slot */
    PyObject **refs; /* N_LISTS * n weak references to the validated tensors */
} plan_t;

static plan_t plans[N_PLANS];
static int next_victim;

static PyObject *ref_target(PyObject *ref) {
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *obj = NULL;
    if (PyWeakref_GetRef(ref, &obj) < 0) PyErr_Clear();
    Py_XDECREF(obj); /* only compared by identity with a live object */
    return obj;
#else
    return PyWeakref_GET_OBJECT(ref);
#endif
}

static void plan_clear(plan_t *plan) {
    const size_t count = (size_t)plan->table.n * N_LISTS;
    for (size_t j = 0; plan->refs != NULL && j < count; j++) Py_XDECREF(plan->refs[j]);
    free(plan->refs);
    plan->refs = NULL;
    table_free(&plan->table);
}

/* The cached plan whose first param is `first` (a plan for a list of n tensors), or NULL. */
static plan_t *plan_find(PyObject *first, Py_ssize_t n) {
    for (int s = 0; s < N_PLANS; s++)
        if (plans[s].table.n == n && ref_target(plans[s].refs[0]) == first) return &plans[s];
    return NULL;
}

/*
 * Whether entry j still is the same object with the same data pointer. A new pointer (from
 * .data = ..., set_, a storage resize, a reallocation) means new memory: validate again.
 * What keeps object and pointer but could change the size (resize_ to fewer elements,
 * slicing .data in place) keeps the memory the plan was validated on, so using the plan is
 * memory-safe; a fresh gradient is checked against the size the plan recorded.
 */
static int entry_unchanged(const plan_t *plan, size_t j, PyObject *x) {
    if (ref_target(plan->refs[j]) != x) return 0;
    void *ptr;
    if (data_ptr_of(x, &ptr) < 0) return -1;
    return ptr == plan->table.ptrs[j];
}

/*
 * Brings a plan up to date with the lists. Every param must be unchanged; any other entry
 * that changed (a fresh gradient after zero_grad(set_to_none=True), a loaded state) is
 * validated on its own and its record replaced. Returns 1 when the plan now describes the
 * lists, 0 when it had to be dropped (validate from scratch), -1 on error (plan dropped).
 */
static int plan_refresh(plan_t *plan, PyObject **items[N_LISTS]) {
    table_t *t = &plan->table;
    const Py_ssize_t n = t->n;
    int rc = 1;
    for (int l = 0; l < N_LISTS && rc == 1; l++) {
        for (Py_ssize_t i = 0; i < n && rc == 1; i++) {
            const size_t j = (size_t)l * n + i;
            PyObject *x = items[l][i];
            const int same = entry_unchanged(plan, j, x);
            if (same != 0) {
                rc = same;
                continue;
            }
            const int status = l == 0 ? STATUS_NEEDS_GROUPING : check_entry(items, l, i, t);
            if (status != STATUS_DONE) {
                rc = status < 0 ? -1 : 0;
                continue;
            }
            PyObject *ref = PyWeakref_NewRef(x, NULL);
            if (ref == NULL) {
                PyErr_Clear();
                rc = 0;
                continue;
            }
            Py_SETREF(plan->refs[j], ref);
        }
    }
    if (rc != 1) plan_clear(plan);
    return rc;
}

/* Stores a copy of a validated table as the plan for these lists (caching is optional:
 * nothing is stored when memory is short or a tensor is not weak-referenceable). */
static void plan_store(plan_t *slot, const table_t *table, PyObject **items[N_LISTS]) {
    const Py_ssize_t n = table->n;
    table_t copy;
    if (table_alloc(&copy, n) < 0) {
        PyErr_Clear();
        return;
    }
    copy.dtype = table->dtype;
    memcpy(copy.ptrs, table->ptrs, (size_t)n * N_LISTS * sizeof(void *));
    memcpy(copy.nbytes, table->nbytes, (size_t)n * 5 * sizeof(int64_t));
    PyObject **refs = (PyObject **)calloc((size_t)n * N_LISTS, sizeof(PyObject *));
    for (size_t j = 0; refs != NULL && j < (size_t)n * N_LISTS; j++) {
        refs[j] = PyWeakref_NewRef(items[j / n][j % n], NULL);
        if (refs[j] == NULL) {
            PyErr_Clear();
            for (size_t k = 0; k < j; k++) Py_DECREF(refs[k]);
            free(refs);
            refs = NULL;
        }
    }
    if (refs == NULL) {
        table_free(&copy);
        return;
    }
    plan_clear(slot);
    slot->table = copy;
    slot->refs = refs;
}

/*
 * Validated pointers of the lists (n > 0 entries each) in `table`, allocated here. With
 * `cache`, a plan for the same tensors is refreshed instead of validating from scratch, and
 * a fresh validation is remembered. The table is this call's own copy: the cache may change
 * while the kernel runs without the GIL. Returns a status or -1.
 */
static int prepare(PyObject **items[N_LISTS], Py_ssize_t n, int cache, table_t *table) {
    if (table_alloc(table, n) < 0) return -1;
    plan_t *plan = cache ? plan_find(items[0][0], n) : NULL;
    const int hit = plan != NULL ? plan_refresh(plan, items) : 0;
    if (hit < 0) return -1;
    if (hit) {
        memcpy(table->ptrs, plan->table.ptrs, (size_t)n * N_LISTS * sizeof(void *));
        memcpy(table->numel, plan->table.numel, (size_t)n * sizeof(int64_t));
        table->dtype = plan->table.dtype;
        return STATUS_DONE;
    }
    const int status = validate(items, table);
    if (status != STATUS_DONE || !cache) return status;
    if (plan == NULL) { /* a dropped plan's slot is reused, else the oldest one */
        plan = &plans[next_victim];
        next_victim = (next_victim + 1) % N_PLANS;
    }
    plan_store(plan, table, items);
    return STATUS_DONE;
}

/* ---- hyperparameters and the kernel call ------------------------------------------------ */

typedef struct {
    double lr, beta1, beta2, weight_decay, eps, clip_exponent;
    int clip_mode, decouple, maximize;
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

/* Reads lr, beta1, beta2, weight_decay, eps, clip_exponent, clip_mode, decouple, maximize
 * from args[0..8]. */
static int hyper_args(PyObject *const *args, hyper_t *h) {
    if (float_arg(args, 0, &h->lr) || float_arg(args, 1, &h->beta1) || float_arg(args, 2, &h->beta2) ||
        float_arg(args, 3, &h->weight_decay) || float_arg(args, 4, &h->eps) ||
        float_arg(args, 5, &h->clip_exponent) || int_arg(args, 6, &h->clip_mode) ||
        bool_arg(args, 7, &h->decouple) || bool_arg(args, 8, &h->maximize))
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
        .num_threads = num_threads,
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
             "     decouple, maximize, num_threads, cache, dry_run) -> int\n\n"
             "One fused ADOPT step over CPU tensors of one dtype (float32/64, float16, "
             "bfloat16).\nReturns DONE, or NEEDS_GROUPING / NEEDS_CONTIGUOUS / NEEDS_UNWRAP without "
             "changing anything.\nclip_mode: CLIP_NONE, CLIP_TABLE (clip_table: float64 tensor, one "
             "threshold per\ntensor) or CLIP_POWER (threshold = step ** clip_exponent). cache: "
             "remember the\nvalidated tensors for the next call (pass False for temporary "
             "views). dry_run:\nvalidate only (same result, nothing runs).");

/* Positional arguments of step(): 8 objects, then the hyperparameters, then 3 ints. */
#define STEP_NARGS 20

/* METH_FASTCALL: no argument tuple is built per call (a tuple per step would also feed
 * the garbage collector's allocation counter). */
static PyObject *py_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != STEP_NARGS)
        return PyErr_Format(PyExc_TypeError, "step() takes %d positional arguments (%zd given)",
                            STEP_NARGS, nargs);
    PyObject *const *lists = args;
    PyObject *clip_table = args[5], *grad_scale = args[6], *found_inf = args[7];
    hyper_t h;
    int num_threads, cache, dry_run;
    if (hyper_args(args + 8, &h) || int_arg(args, 17, &num_threads) || bool_arg(args, 18, &cache) ||
        bool_arg(args, 19, &dry_run))
        return NULL;

    PyObject *fast[N_LISTS] = {NULL, NULL, NULL, NULL, NULL};
    PyObject **items[N_LISTS];
    table_t table = {0, -1, NULL, NULL, NULL};
    PyObject *result = NULL;
    Py_ssize_t n = 0;
    for (int l = 0; l < N_LISTS; l++) {
        fast[l] = PySequence_Fast(lists[l], "tensor lists must be lists or tuples");
        if (fast[l] == NULL) goto done;
        if (l > 0 && PySequence_Fast_GET_SIZE(fast[l]) != n) {
            PyErr_Format(PyExc_ValueError, "%s has %zd entries but params has %zd",
                         list_names[l], PySequence_Fast_GET_SIZE(fast[l]), n);
            goto done;
        }
        n = PySequence_Fast_GET_SIZE(fast[l]);
        items[l] = PySequence_Fast_ITEMS(fast[l]);
    }
    if (n == 0) {
        result = PyLong_FromLong(STATUS_DONE);
        goto done;
    }
    const int status = prepare(items, n, cache, &table);
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
    /* The kernel only reads this call's own table, so the GIL can be released. */
    int rc = 0;
    if (!dry_run) {
        Py_BEGIN_ALLOW_THREADS
        rc = adopt_cpu_step(&a);
        Py_END_ALLOW_THREADS
    }
    if (rc != 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyLong_FromLong(STATUS_DONE);

done:
    table_free(&table);
    for (int l = 0; l < N_LISTS; l++) Py_XDECREF(fast[l]);
    return result;
}

/* ---- step_groups() ----------------------------------------------------------------------- */

/* One param group of step_groups(): its gathered tensors (new references, N_LISTS * cap,
 * list l at objs + l * cap, the first n used), their validated table, its hyperparameters. */
typedef struct {
    PyObject **objs;
    Py_ssize_t cap, n;
    table_t table;
    hyper_t hyper;
} group_t;

static void group_free(group_t *g) {
    for (int l = 0; l < N_LISTS && g->objs != NULL; l++)
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

/*
 * The lists ADOPT._init_group builds for `params`: each parameter with a gradient, the
 * gradient and the parameter's exp_avg, exp_avg_sq and step from `state`. `pos` walks the
 * state dict (see state_of). Returns STATUS_DONE, STATUS_DECLINED when a parameter with a
 * gradient has no (complete) state, or -1.
 */
static int gather(PyObject *params, PyObject *state, Py_ssize_t *pos, group_t *g) {
    PyObject *fast = PySequence_Fast(params, "params must be a list or tuple");
    if (fast == NULL) return -1;
    g->cap = PySequence_Fast_GET_SIZE(fast);
    g->objs = (PyObject **)malloc(((size_t)g->cap * N_LISTS + 1) * sizeof(PyObject *));
    if (g->objs == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    int status = STATUS_DONE;
    for (Py_ssize_t i = 0; i < g->cap && status == STATUS_DONE; i++) {
        PyObject *p = PySequence_Fast_GET_ITEM(fast, i);
        PyObject *grad = get(attr_grad, p);
        if (grad == NULL) {
            status = -1;
            break;
        }
        if (grad == Py_None) {
            Py_DECREF(grad);
            continue;
        }
        PyObject *entry[N_LISTS] = {p, grad, NULL, NULL, NULL};
        PyObject *p_state = state_of(state, p, pos);
        if (p_state != NULL && PyDict_Check(p_state)) {
            entry[2] = PyDict_GetItemWithError(p_state, str_exp_avg);
            entry[3] = entry[2] == NULL ? NULL : PyDict_GetItemWithError(p_state, str_exp_avg_sq);
            entry[4] = entry[3] == NULL ? NULL : PyDict_GetItemWithError(p_state, str_step);
        }
        if (entry[4] == NULL) {
            Py_DECREF(grad);
            status = PyErr_Occurred() ? -1 : STATUS_DECLINED;
            break;
        }
        for (int l = 0; l < N_LISTS; l++) g->objs[l * g->cap + g->n] = l == 1 ? grad : Py_NewRef(entry[l]);
        g->n++;
    }
    Py_DECREF(fast);
    return status;
}

PyDoc_STRVAR(step_groups_doc,
             "step_groups(groups, state, grad_scale, found_inf, num_threads) -> int\n\n"
             "One fused step of an optimizer's param groups. Each group is a tuple (params, lr,\n"
             "beta1, beta2, weight_decay, eps, clip_exponent, clip_mode, decouple, maximize);\n"
             "state maps each param to its dict of exp_avg, exp_avg_sq and step. Returns DONE\n"
             "once every group is updated, or DECLINED, having changed nothing, whenever the\n"
             "general path must run instead (a param without state, a tensor this kernel does\n"
             "not take, or any error, which the general path then reports).");

#define GROUP_FIELDS 10

static int prepare_group(PyObject *spec, PyObject *state, Py_ssize_t *pos, group_t *g) {
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != GROUP_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "each group must be a tuple of 10 fields");
        return -1;
    }
    PyObject *const *fields = &PyTuple_GET_ITEM(spec, 0);
    if (hyper_args(fields + 1, &g->hyper) < 0) return -1;
    const int status = gather(fields[0], state, pos, g);
    if (status != STATUS_DONE || g->n == 0) return status;
    PyObject **items[N_LISTS];
    for (int l = 0; l < N_LISTS; l++) items[l] = g->objs + l * g->cap;
    const int prepared = prepare(items, g->n, 1, &g->table);
    return prepared == STATUS_DONE || prepared < 0 ? prepared : STATUS_DECLINED;
}

static PyObject *py_step_groups(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5)
        return PyErr_Format(PyExc_TypeError, "step_groups() takes 5 positional arguments (%zd given)", nargs);
    PyObject *state = args[1];
    int num_threads;
    if (!PyDict_Check(state)) return PyErr_Format(PyExc_TypeError, "state must be a dict");
    if (int_arg(args, 4, &num_threads) < 0) return NULL;
    PyObject *fast = PySequence_Fast(args[0], "groups must be a list or tuple");
    if (fast == NULL) return NULL;
    const Py_ssize_t n_groups = PySequence_Fast_GET_SIZE(fast);
    group_t *groups = (group_t *)calloc((size_t)n_groups + 1, sizeof(group_t));
    int status = groups == NULL ? -1 : STATUS_DONE;
    if (groups == NULL) PyErr_NoMemory();
    const float *scale_ptr = NULL, *inf_ptr = NULL;
    if (status == STATUS_DONE &&
        (amp_scalar(args[2], "grad_scale", &scale_ptr) || amp_scalar(args[3], "found_inf", &inf_ptr)))
        status = -1;
    /* Every group is validated before any runs. */
    Py_ssize_t pos = 0;
    for (Py_ssize_t k = 0; k < n_groups && status == STATUS_DONE; k++)
        status = prepare_group(PySequence_Fast_GET_ITEM(fast, k), state, &pos, &groups[k]);
    if (status < 0 && PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear(); /* the general path raises it again, with its own message */
        status = STATUS_DECLINED;
    }
    int rc = 0;
    if (status == STATUS_DONE) {
        /* The gathered references keep every tensor alive while the GIL is released. */
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < n_groups && rc == 0; k++) {
            if (groups[k].n == 0) continue;
            const adopt_cpu_args a = kernel_args(&groups[k].table, &groups[k].hyper, NULL, scale_ptr,
                                                 inf_ptr, num_threads);
            rc = adopt_cpu_step(&a);
        }
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t k = 0; groups != NULL && k < n_groups; k++) group_free(&groups[k]);
    free(groups);
    Py_DECREF(fast);
    if (rc != 0) return PyErr_NoMemory();
    return status < 0 ? NULL : PyLong_FromLong(status);
}

PyDoc_STRVAR(host_steps_doc,
             "host_steps(state_steps) -> list[int] | None\n\n"
             "The step counts as ints, or None unless every step is a float32 CPU scalar.");

static PyObject *py_host_steps(PyObject *self, PyObject *steps) {
    (void)self;
    PyObject *fast = PySequence_Fast(steps, "state_steps must be a list or tuple");
    if (fast == NULL) return NULL;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        float *ptr;
        if (float_buffer(items[i], "each state step", &ptr) < 0) {
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
    Py_DECREF(fast);
    return out;
}

static PyObject *py_has_openmp(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyBool_FromLong(adopt_cpu_has_openmp());
}

static PyMethodDef methods[] = {
    {"step", (PyCFunction)(void (*)(void))py_step, METH_FASTCALL, step_doc},
    {"step_groups", (PyCFunction)(void (*)(void))py_step_groups, METH_FASTCALL, step_groups_doc},
    {"host_steps", py_host_steps, METH_O, host_steps_doc},
    {"has_openmp", py_has_openmp, METH_NOARGS, "Whether the kernel was built with OpenMP."},
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
    static const char *dtype_names[4] = {"float32", "float64", "float16", "bfloat16"};
    PyObject *torch = PyImport_ImportModule("torch");
    if (torch == NULL) return NULL;
    PyObject *c = PyObject_GetAttrString(torch, "_C");
    PyObject *base = c == NULL ? NULL : PyObject_GetAttrString(c, "TensorBase");
    disabled_dispatch = c == NULL ? NULL : PyObject_GetAttrString(c, "_disabled_torch_dispatch_impl");
    Py_XDECREF(c);
    PyObject *nn = PyObject_GetAttrString(torch, "nn");
    parameter_type = nn == NULL ? NULL : PyObject_GetAttrString(nn, "Parameter");
    Py_XDECREF(nn);
    tensor_type = PyObject_GetAttrString(torch, "Tensor");
    str_torch_dispatch = PyUnicode_InternFromString("__torch_dispatch__");
    int ok = base != NULL && disabled_dispatch != NULL && parameter_type != NULL && tensor_type != NULL &&
             str_torch_dispatch != NULL && PyType_Check(tensor_type);
    for (int k = 0; ok && k < 4; k++) ok = (torch_dtypes[k] = PyObject_GetAttrString(torch, dtype_names[k])) != NULL;
    ok = ok && (attr_data_ptr = PyObject_GetAttrString(base, "data_ptr")) != NULL &&
         (attr_is_contiguous = PyObject_GetAttrString(base, "is_contiguous")) != NULL &&
         (attr_nbytes = PyObject_GetAttrString(base, "nbytes")) != NULL &&
         (attr_dtype = PyObject_GetAttrString(base, "dtype")) != NULL &&
         (attr_is_cpu = PyObject_GetAttrString(base, "is_cpu")) != NULL &&
         (attr_grad = PyObject_GetAttrString(base, "grad")) != NULL &&
         (str_exp_avg = PyUnicode_InternFromString("exp_avg")) != NULL &&
         (str_exp_avg_sq = PyUnicode_InternFromString("exp_avg_sq")) != NULL &&
         (str_step = PyUnicode_InternFromString("step")) != NULL;
    Py_XDECREF(base);
    Py_DECREF(torch);
    if (!ok) return NULL;
    if (Py_IS_TYPE(attr_data_ptr, &PyMethodDescr_Type)) {
        PyMethodDef *def = ((PyMethodDescrObject *)attr_data_ptr)->d_method;
        if ((def->ml_flags & (METH_VARARGS | METH_FASTCALL | METH_NOARGS | METH_O | METH_KEYWORDS)) == METH_NOARGS)
            data_ptr_function = def->ml_meth;
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
        PyModule_AddIntConstant(m, "CLIP_POWER", ADOPT_CLIP_POWER)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
