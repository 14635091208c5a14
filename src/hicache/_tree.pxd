# Declarations of the C++ tree core (cpp/include/hicache/radix_tree.h) and of its Cython wrapper.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libcpp cimport bool as cbool
from libcpp.memory cimport unique_ptr
from libcpp.string cimport string
from libcpp.string_view cimport string_view
from libcpp.vector cimport vector


cdef extern from "_exception_bridge.h":
    void set_hicache_error_types(object invalid, object index, object invariant)
    void translate_cpp_exception()


cdef extern from "hicache/page_hash.h" namespace "hicache" nogil:
    cdef cppclass Digest "hicache::Digest":
        uint8_t* data()


cdef extern from "hicache/radix_tree.h" namespace "hicache" nogil:
    ctypedef int64_t NodeId
    ctypedef int32_t Token
    ctypedef int64_t SlotIndex

    cdef cppclass CMatchResult "hicache::MatchResult":
        vector[SlotIndex] device_indices
        NodeId last_device_node
        NodeId last_host_node
        NodeId best_match_node
        int64_t host_hit_length
        int64_t mamba_branching_seqlen
        int64_t swa_branching_seqlen

    cdef cppclass CInsertResult "hicache::InsertResult":
        int64_t prefix_len
        NodeId last_node
        int64_t adopted_len
        int64_t cached_len
        cbool mamba_exist
        cbool mamba_taken
        vector[SlotIndex] swa_remap_dst
        vector[SlotIndex] swa_remap_src
        vector[SlotIndex] swa_host_spare

    cdef cppclass CLockReceipt "hicache::LockReceipt":
        NodeId node_id
        int64_t delta
        NodeId mamba_node_id
        int64_t swa_lock_tokens

    cdef cppclass CEvictResult "hicache::EvictResult":
        vector[SlotIndex] device_freed
        vector[SlotIndex] host_freed
        int64_t demoted_tokens
        int64_t dropped_tokens
        NodeId needs_backup
        vector[SlotIndex] mamba_freed
        vector[SlotIndex] swa_freed

    cdef cppclass CTransferPlan "hicache::TransferPlan":
        vector[NodeId] nodes
        vector[int64_t] lengths
        vector[SlotIndex] indices
        vector[SlotIndex] states
        vector[unsigned char] swa
        vector[SlotIndex] swa_indices

    cdef cppclass CNodeInfo "hicache::NodeInfo":
        NodeId node_id
        NodeId parent_id
        int64_t num_tokens
        int64_t num_children
        int64_t lock_ref
        int64_t host_ref_counter
        uint64_t hit_count
        uint64_t last_access_time
        cbool has_device_value
        cbool has_host_value
        cbool backup_pending
        cbool load_pending
        cbool load_failed
        cbool has_mamba_value
        SlotIndex mamba_value
        int64_t mamba_lock_ref
        cbool has_mamba_host_value
        SlotIndex mamba_host_value
        cbool has_swa_value
        int64_t swa_lock_ref
        cbool has_swa_host_value
        string extra_key
        cbool has_extra_key

    cdef cppclass CRadixTree "hicache::RadixTree":
        CRadixTree(int64_t page_size, int64_t num_device_slots, int64_t num_host_slots,
                   cbool mamba, int64_t num_mamba_slots,
                   int64_t num_mamba_host_slots, int64_t sliding_window_size,
                   int64_t num_swa_host_slots) except +translate_cpp_exception
        int64_t page_size()
        int64_t num_device_slots()
        int64_t num_host_slots()
        cbool has_mamba()
        cbool has_swa()
        int64_t sliding_window_size()
        CMatchResult match_prefix(const Token* key, size_t length,
                                  string_view extra_key) except +translate_cpp_exception
        CTransferPlan storage_backup_plan(NodeId ack_id) except +translate_cpp_exception
        CInsertResult insert(const Token* key, size_t length, const SlotIndex* value,
                             size_t value_len, string_view extra_key,
                             SlotIndex mamba_value,
                             int64_t swa_evicted_seqlen) except +translate_cpp_exception
        CLockReceipt inc_lock_ref(NodeId node_id) except +translate_cpp_exception
        int64_t dec_lock_ref(NodeId node_id, NodeId mamba_node_id,
                             int64_t swa_lock_tokens) except +translate_cpp_exception
        int64_t inc_host_lock_ref(NodeId node_id) except +translate_cpp_exception
        int64_t dec_host_lock_ref(NodeId node_id) except +translate_cpp_exception
        CEvictResult evict(int64_t num_tokens, cbool write_back) except +translate_cpp_exception
        vector[SlotIndex] evict_host(int64_t num_tokens) except +translate_cpp_exception
        CEvictResult evict_mamba(int64_t num_states,
                                 cbool write_back) except +translate_cpp_exception
        CEvictResult evict_swa(int64_t num_tokens,
                               cbool write_back) except +translate_cpp_exception
        CTransferPlan backup_plan(NodeId node_id,
                                  uint64_t min_hit_count) except +translate_cpp_exception
        void commit_backup(NodeId node_id, const SlotIndex* host, size_t length,
                           SlotIndex host_state, const SlotIndex* host_swa,
                           size_t host_swa_len) except +translate_cpp_exception
        void finish_backup(NodeId ack_id) except +translate_cpp_exception
        CTransferPlan state_backup_plan(NodeId node_id) except +translate_cpp_exception
        void commit_state_backup(NodeId node_id,
                                 SlotIndex host_state) except +translate_cpp_exception
        void finish_state_backup(NodeId ack_id) except +translate_cpp_exception
        void abort_state_backup(NodeId ack_id) except +translate_cpp_exception
        vector[SlotIndex] abort_backup(NodeId ack_id) except +translate_cpp_exception
        CTransferPlan load_back_plan(NodeId anchor) except +translate_cpp_exception
        void finish_load_back(NodeId ack_id) except +translate_cpp_exception
        int64_t abort_load_back(NodeId ack_id) except +translate_cpp_exception
        vector[SlotIndex] take_failed_load_slots() except +translate_cpp_exception
        void commit_load_back(NodeId anchor, const SlotIndex* device, size_t length,
                              SlotIndex device_state) except +translate_cpp_exception
        int64_t evictable_size()
        int64_t protected_size()
        int64_t total_size()
        int64_t host_total_size()
        int64_t host_evictable_size()
        int64_t host_protected_size()
        int64_t load_failed_size()
        int64_t mamba_evictable_size()
        int64_t mamba_protected_size()
        int64_t swa_evictable_size()
        int64_t swa_protected_size()
        int64_t swa_host_size()
        int64_t num_nodes()
        cbool contains_node(NodeId node_id)
        CNodeInfo node_info(NodeId node_id) except +translate_cpp_exception
        vector[NodeId] node_ids() except +translate_cpp_exception
        vector[Token] node_key(NodeId node_id) except +translate_cpp_exception
        vector[SlotIndex] all_device_indices() except +translate_cpp_exception
        vector[SlotIndex] all_host_indices() except +translate_cpp_exception
        vector[SlotIndex] all_mamba_indices() except +translate_cpp_exception
        vector[SlotIndex] all_mamba_host_indices() except +translate_cpp_exception
        vector[SlotIndex] take_failed_load_states() except +translate_cpp_exception
        vector[SlotIndex] take_freed_mamba_host_slots() except +translate_cpp_exception
        vector[SlotIndex] take_freed_swa_host_slots() except +translate_cpp_exception
        vector[SlotIndex] all_swa_indices() except +translate_cpp_exception
        vector[SlotIndex] all_swa_host_indices() except +translate_cpp_exception
        vector[SlotIndex] reset() except +translate_cpp_exception
        string pretty_print() except +translate_cpp_exception
        void check_invariants() except +translate_cpp_exception
        void enable_page_hashes() except +translate_cpp_exception
        cbool has_page_hashes()
        vector[Digest] node_page_hashes(NodeId node_id) except +translate_cpp_exception
        vector[Digest] path_page_hashes(NodeId node_id) except +translate_cpp_exception
        CInsertResult insert_host(NodeId anchor, const Token* key, size_t length,
                                  const SlotIndex* host, size_t host_len,
                                  string_view extra_key,
                                  SlotIndex mamba_host_value, const SlotIndex* host_swa,
                                  size_t host_swa_len) except +translate_cpp_exception
        CTransferPlan storage_backup_plan(NodeId ack_id) except +translate_cpp_exception


cdef class Int64Buffer:
    cdef vector[SlotIndex] data
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]


cdef class RadixTree:
    cdef unique_ptr[CRadixTree] _tree
    cdef vector[Token] _key_scratch
    cdef vector[SlotIndex] _value_scratch
    cdef readonly int64_t page_size
    cdef readonly int64_t num_device_slots
    cdef readonly int64_t num_host_slots
    cdef readonly cbool mamba
    cdef readonly int64_t num_mamba_slots
    cdef readonly int64_t num_mamba_host_slots
    cdef readonly int64_t sliding_window_size
    cdef readonly int64_t num_swa_host_slots
    cdef int _as_tokens(self, object key, const Token** out, size_t* n) except -1
    cdef int _as_slots(self, object value, const SlotIndex** out, size_t* n) except -1
