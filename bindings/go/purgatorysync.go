// Package purgatorysync embeds the purgatory-sync engine in a Go program: it fetches the
// missing git data of events waiting in a GRASP relay's purgatory, politely, and reports when
// each event is released (all its objects are in its repository) or expired.
//
// The engine runs on its own threads inside libpurgatory_sync (the C ABI, built and installed
// by capi/install.sh in the purgatory-sync repository; cgo finds it with pkg-config). Every
// method of Engine may be called from any goroutine. Errors are values of this call only
// (*Error, with the C ABI's status): the package uses the ABI's per-call error objects, never
// its per-thread message, which a goroutine could read on another OS thread.
//
// Outcomes arrive on the channel of Outcomes(ctx), fed through the engine's readiness
// descriptor and Go's netpoller: no OS thread blocks while a host waits for them.
package purgatorysync

/*
#cgo pkg-config: purgatory_sync
#include <stdint.h>
#include <stdlib.h>
#include "purgatory_sync.h"

psync_status psync_go_log_to(psync_log_level level, uintptr_t handle, psync_error **error);
*/
import "C"

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime/cgo"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

// Status is the C ABI's psync_status.
type Status int

// The statuses of purgatory_sync.h.
const (
	StatusOK                           Status = C.PSYNC_OK
	StatusNullArgument                 Status = C.PSYNC_NULL_ARGUMENT
	StatusInvalidUTF8                  Status = C.PSYNC_INVALID_UTF8
	StatusInvalidJSON                  Status = C.PSYNC_INVALID_JSON
	StatusInvalidConfig                Status = C.PSYNC_INVALID_CONFIG
	StatusStateFile                    Status = C.PSYNC_STATE_FILE
	StatusSpawnFailed                  Status = C.PSYNC_SPAWN_FAILED
	StatusTimeout                      Status = C.PSYNC_TIMEOUT
	StatusDisconnected                 Status = C.PSYNC_DISCONNECTED
	StatusPanic                        Status = C.PSYNC_PANIC
	StatusShutdownError                Status = C.PSYNC_SHUTDOWN_ERROR
	StatusEngineShutDown               Status = C.PSYNC_ENGINE_SHUT_DOWN
	StatusStateFileLocked              Status = C.PSYNC_STATE_FILE_LOCKED
	StatusOtherError                   Status = C.PSYNC_OTHER_ERROR
	StatusLoggerUnavailable            Status = C.PSYNC_LOGGER_UNAVAILABLE
	StatusInvalidEventID               Status = C.PSYNC_INVALID_EVENT_ID
	StatusInvalidIdentifier            Status = C.PSYNC_INVALID_IDENTIFIER
	StatusNoObjectIDs                  Status = C.PSYNC_NO_OBJECT_IDS
	StatusTooManyObjectIDs             Status = C.PSYNC_TOO_MANY_OBJECT_IDS
	StatusInvalidObjectID              Status = C.PSYNC_INVALID_OBJECT_ID
	StatusTooManyCloneURLs             Status = C.PSYNC_TOO_MANY_CLONE_URLS
	StatusInvalidCloneURL              Status = C.PSYNC_INVALID_CLONE_URL
	StatusInvalidRepository            Status = C.PSYNC_INVALID_REPOSITORY
	StatusPreviouslyExpired            Status = C.PSYNC_PREVIOUSLY_EXPIRED
	StatusQueueFull                    Status = C.PSYNC_QUEUE_FULL
	StatusShuttingDown                 Status = C.PSYNC_SHUTTING_DOWN
	StatusTooManyRefUpdates            Status = C.PSYNC_TOO_MANY_REF_UPDATES
	StatusInvalidRefUpdate             Status = C.PSYNC_INVALID_REF_UPDATE
	StatusReplaceRefsWithoutRefUpdates Status = C.PSYNC_REPLACE_REFS_WITHOUT_REF_UPDATES
	StatusTooManyIdentifierURLs        Status = C.PSYNC_TOO_MANY_IDENTIFIER_URLS
	StatusOtherSubmitError             Status = C.PSYNC_OTHER_SUBMIT_ERROR
)

// Error is the error of one call: the C ABI's status and message. Compare statuses with
// errors.Is(err, purgatorysync.StatusInvalidObjectID).
type Error struct {
	Status  Status
	Message string
}

func (e *Error) Error() string {
	return fmt.Sprintf("purgatory-sync: %s (status %d)", e.Message, int(e.Status))
}

// Is reports whether target is this error's Status.
func (e *Error) Is(target error) bool {
	if s, ok := target.(Status); ok {
		return e.Status == s
	}
	return false
}

// Error makes a Status usable as the target of errors.Is.
func (s Status) Error() string {
	return fmt.Sprintf("purgatory-sync status %d", int(s))
}

// takeError turns the status and error object of an `_err` call into a Go error, freeing the
// object.
// (cgo gives a function returning the psync_status enum an unsigned result.)
func takeError[S ~uint32 | ~int32](status S, cerr *C.psync_error) error {
	if status == S(C.PSYNC_OK) {
		return nil
	}
	e := &Error{Status: Status(status)}
	if cerr != nil {
		e.Message = C.GoString(C.psync_error_message(cerr))
		C.psync_error_free(cerr)
	}
	return e
}

// DomainLimits are the politeness limits of one domain.
type DomainLimits struct {
	MaxConcurrent int    `json:"max_concurrent"`
	PerMinute     uint32 `json:"per_minute"`
	Burst         uint32 `json:"burst,omitempty"`
}

// Config is the engine's configuration. A zero field means the library's default (see
// psync_engine_new in purgatory_sync.h for every default and range); the fields whose zero is
// a meaningful value are pointers (Duration(0) gives one).
type Config struct {
	Workers                  int
	Tick                     time.Duration
	UserDelay                *time.Duration
	SyncDelay                *time.Duration
	BackoffBase              time.Duration
	BackoffCap               time.Duration
	EventLifetime            time.Duration
	ExpiredMemory            *time.Duration
	FetchDeadline            time.Duration
	ConnectTimeout           time.Duration
	IOTimeout                time.Duration
	ShutdownTimeout          *time.Duration
	CheckpointInterval       time.Duration
	NaughtyDuration          *time.Duration
	DomainRetention          time.Duration
	MaxEvents                int
	MaxOIDsPerEvent          int
	MaxURLsPerEvent          int
	MaxURLsPerIdentifier     int
	MaxRefUpdatesPerEvent    int
	MaxFetchBytes            int64
	MaxFetchMemory           int64
	MaxTotalFetchMemory      int64
	MaxObjectSize            int64
	MaxAdvertisementBytes    int64
	FetchDepth               int
	ThreadName               string
	DomainLimits             *DomainLimits
	DomainOverrides          map[string]DomainLimits
	OurDomain                string
	AllowPrivateAddresses    bool
	AllowedSchemes           []string
	StateFile                string
	MoveUnreadableStateAside bool
	HideTempRefs             *bool
}

// Duration returns a pointer to d, for the pointer fields of Config.
func Duration(d time.Duration) *time.Duration { return &d }

func (c Config) json() ([]byte, error) {
	m := map[string]any{}
	ms := func(key string, d time.Duration) {
		if d != 0 {
			m[key] = d.Milliseconds()
		}
	}
	msp := func(key string, d *time.Duration) {
		if d != nil {
			m[key] = d.Milliseconds()
		}
	}
	n := func(key string, v int64) {
		if v != 0 {
			m[key] = v
		}
	}
	n("workers", int64(c.Workers))
	ms("tick_ms", c.Tick)
	msp("user_delay_ms", c.UserDelay)
	msp("sync_delay_ms", c.SyncDelay)
	ms("backoff_base_ms", c.BackoffBase)
	ms("backoff_cap_ms", c.BackoffCap)
	ms("event_lifetime_ms", c.EventLifetime)
	msp("expired_memory_ms", c.ExpiredMemory)
	ms("fetch_deadline_ms", c.FetchDeadline)
	ms("connect_timeout_ms", c.ConnectTimeout)
	ms("io_timeout_ms", c.IOTimeout)
	msp("shutdown_timeout_ms", c.ShutdownTimeout)
	ms("checkpoint_interval_ms", c.CheckpointInterval)
	msp("naughty_duration_ms", c.NaughtyDuration)
	ms("domain_retention_ms", c.DomainRetention)
	n("max_events", int64(c.MaxEvents))
	n("max_oids_per_event", int64(c.MaxOIDsPerEvent))
	n("max_urls_per_event", int64(c.MaxURLsPerEvent))
	n("max_urls_per_identifier", int64(c.MaxURLsPerIdentifier))
	n("max_ref_updates_per_event", int64(c.MaxRefUpdatesPerEvent))
	n("max_fetch_bytes", c.MaxFetchBytes)
	n("max_fetch_memory", c.MaxFetchMemory)
	n("max_total_fetch_memory", c.MaxTotalFetchMemory)
	n("max_object_size", c.MaxObjectSize)
	n("max_advertisement_bytes", c.MaxAdvertisementBytes)
	n("fetch_depth", int64(c.FetchDepth))
	if c.ThreadName != "" {
		m["thread_name"] = c.ThreadName
	}
	if c.DomainLimits != nil {
		m["domain_limits"] = c.DomainLimits
	}
	// A nil map is encoded as null, which the library reads as absent.
	m["domain_overrides"] = c.DomainOverrides
	if c.OurDomain != "" {
		m["our_domain"] = c.OurDomain
	}
	m["allow_private_addresses"] = c.AllowPrivateAddresses
	m["allowed_schemes"] = c.AllowedSchemes
	if c.StateFile != "" {
		m["state_file"] = c.StateFile
	}
	m["move_unreadable_state_aside"] = c.MoveUnreadableStateAside
	if c.HideTempRefs != nil {
		m["hide_temp_refs"] = *c.HideTempRefs
	}
	return json.Marshal(m)
}

// Origin says where an event came from.
type Origin string

const (
	// Sync: received from another relay; first tried after 500 ms.
	Sync Origin = "sync"
	// User: published by a user to this relay, who is expected to push; first tried after
	// 180 s.
	User Origin = "user"
)

// RefUpdate is a ref written when the event is released: exactly one of OID, Symbolic and
// Delete.
type RefUpdate struct {
	Name     string `json:"name"`
	OID      string `json:"oid,omitempty"`
	Symbolic string `json:"symbolic,omitempty"`
	Delete   bool   `json:"delete,omitempty"`
}

// Event is an event waiting in purgatory. Nil slices are fine.
type Event struct {
	ID          string      `json:"id"`
	Identifier  string      `json:"identifier"`
	Repo        string      `json:"repo"`
	OIDs        []string    `json:"oids"`
	CloneURLs   []string    `json:"clone_urls"`
	Origin      Origin      `json:"origin,omitempty"`
	RefUpdates  []RefUpdate `json:"ref_updates"`
	ReplaceRefs bool        `json:"replace_refs,omitempty"`
	CreatedAt   *uint64     `json:"created_at,omitempty"`
}

// RefusedURL is a clone URL the engine's URL policy refused.
type RefusedURL struct {
	Index  int    `json:"index"`
	URL    string `json:"url"`
	Reason string `json:"reason"`
}

// Admission is how Submit took an event.
type Admission struct {
	// AlreadySatisfied: every object was present (and its refs written); no outcome follows.
	AlreadySatisfied bool
	// RefusedURLs are the clone URLs that will not be fetched.
	RefusedURLs []RefusedURL
}

// Outcome is what finally happened to an event: Kind "released" or "expired".
type Outcome struct {
	Kind           string   `json:"kind"`
	EventID        string   `json:"event_id"`
	Identifier     string   `json:"identifier"`
	Repo           string   `json:"repo"`
	WaitedMs       uint64   `json:"waited_ms"`
	Refs           string   `json:"refs,omitempty"`
	NewerCreatedAt *uint64  `json:"newer_created_at,omitempty"`
	Missing        []string `json:"missing,omitempty"`
	Reason         string   `json:"reason,omitempty"`
	Message        string   `json:"message,omitempty"`
}

// Released reports whether the event's objects all arrived.
func (o Outcome) Released() bool { return o.Kind == "released" }

// Engine is a running engine. Every method may be called from any goroutine.
type Engine struct {
	// mu guards ptr against Close: calls hold it for reading.
	mu  sync.RWMutex
	ptr *C.psync_engine
	fd  int
}

// ErrClosed is returned by calls on a closed Engine.
var ErrClosed = errors.New("purgatory-sync: engine closed")

// New builds and starts an engine.
func New(cfg Config) (*Engine, error) {
	text, err := cfg.json()
	if err != nil {
		return nil, err
	}
	ctext := C.CString(string(text))
	defer C.free(unsafe.Pointer(ctext))
	var ptr *C.psync_engine
	var cerr *C.psync_error
	if err := takeError(C.psync_engine_new_err(ctext, &ptr, &cerr), cerr); err != nil {
		return nil, err
	}
	var fd C.int
	if err := takeError(C.psync_engine_ready_fd(ptr, &fd, &cerr), cerr); err != nil {
		C.psync_engine_free(ptr)
		return nil, err
	}
	return &Engine{ptr: ptr, fd: int(fd)}, nil
}

// call runs f with the live engine, or returns ErrClosed.
func (e *Engine) call(f func(*C.psync_engine) error) error {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.ptr == nil {
		return ErrClosed
	}
	return f(e.ptr)
}

// Submit hands an event to the engine. It validates the event and checks which objects the
// repository already has, then returns; it never waits for the network.
func (e *Engine) Submit(ev Event) (Admission, error) {
	text, err := json.Marshal(ev)
	if err != nil {
		return Admission{}, err
	}
	var adm Admission
	err = e.call(func(p *C.psync_engine) error {
		ctext := C.CString(string(text))
		defer C.free(unsafe.Pointer(ctext))
		var admission uint32
		var refused *C.char
		var cerr *C.psync_error
		if err := takeError(C.psync_engine_submit_err(p, ctext, &admission, &refused, &cerr), cerr); err != nil {
			return err
		}
		defer C.psync_string_free(refused)
		adm.AlreadySatisfied = admission == uint32(C.PSYNC_ADMISSION_ALREADY_SATISFIED)
		return json.Unmarshal([]byte(C.GoString(refused)), &adm.RefusedURLs)
	})
	return adm, err
}

func (e *Engine) withString(s string, f func(*C.psync_engine, *C.char, **C.psync_error) uint32) error {
	return e.call(func(p *C.psync_engine) error {
		cs := C.CString(s)
		defer C.free(unsafe.Pointer(cs))
		var cerr *C.psync_error
		return takeError(f(p, cs, &cerr), cerr)
	})
}

// Cancel forgets a waiting event: no outcome follows for it. Unknown ids are ignored.
func (e *Engine) Cancel(eventID string) error {
	return e.withString(eventID, func(p *C.psync_engine, s *C.char, cerr **C.psync_error) uint32 {
		return C.psync_engine_cancel_err(p, s, cerr)
	})
}

// GitDataArrived tells the engine that git data for identifier arrived (a push): its
// repositories are re-checked at once.
func (e *Engine) GitDataArrived(identifier string) error {
	return e.withString(identifier, func(p *C.psync_engine, s *C.char, cerr **C.psync_error) uint32 {
		return C.psync_engine_git_data_arrived_err(p, s, cerr)
	})
}

// TryNext takes the next outcome without waiting. ok is false when none waits; err is
// ErrClosed, or an *Error with StatusDisconnected once the engine is shut down and drained.
func (e *Engine) TryNext() (o Outcome, ok bool, err error) {
	err = e.call(func(p *C.psync_engine) error {
		var out *C.psync_outcome
		var cerr *C.psync_error
		status := C.psync_engine_poll_err(p, 0, &out, &cerr)
		if Status(status) == StatusTimeout {
			C.psync_error_free(cerr)
			return nil
		}
		if err := takeError(status, cerr); err != nil {
			return err
		}
		defer C.psync_outcome_free(out)
		ok = true
		return json.Unmarshal([]byte(C.GoString(C.psync_outcome_json(out))), &o)
	})
	return o, ok, err
}

// Outcomes returns a channel that receives every outcome this call takes, until ctx is done
// or the engine is shut down and every outcome was taken; then it is closed. A goroutine waits
// on the engine's readiness descriptor through Go's netpoller, so no OS thread is held while
// nothing happens. Several callers share the outcomes: each goes to exactly one of them.
func (e *Engine) Outcomes(ctx context.Context) <-chan Outcome {
	out := make(chan Outcome)
	go func() {
		defer close(out)
		f, err := e.readyFile()
		if err != nil {
			return
		}
		defer f.Close()
		raw, err := f.SyscallConn()
		if err != nil {
			return
		}
		// ctx's end wakes the wait below: a deadline in the past.
		finished := make(chan struct{})
		defer close(finished)
		go func() {
			select {
			case <-ctx.Done():
				_ = f.SetReadDeadline(time.Unix(1, 0))
			case <-finished:
			}
		}()
		for ctx.Err() == nil {
			var next Outcome
			var have, done bool
			// Read calls the function, and while it returns false waits until the descriptor
			// is readable (or the deadline set on ctx's end passes).
			err := raw.Read(func(uintptr) bool {
				o, ok, err := e.TryNext()
				switch {
				case err != nil:
					done = true
					return true
				case ok:
					next, have = o, true
					return true
				}
				return false
			})
			if err != nil || done {
				return
			}
			if have {
				select {
				case out <- next:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out
}

// readyFile is a duplicate of the engine's readiness descriptor as an *os.File registered
// with the netpoller (closing it leaves the engine's own descriptor open).
func (e *Engine) readyFile() (*os.File, error) {
	var dup int
	err := e.call(func(*C.psync_engine) error {
		var err error
		dup, err = syscall.Dup(e.fd)
		return err
	})
	if err != nil {
		return nil, err
	}
	syscall.CloseOnExec(dup)
	if err := syscall.SetNonblock(dup, true); err != nil {
		syscall.Close(dup)
		return nil, err
	}
	return os.NewFile(uintptr(dup), "purgatory-sync-ready"), nil
}

func (e *Engine) text(f func(*C.psync_engine, **C.char, **C.psync_error) uint32) (string, error) {
	var s string
	err := e.call(func(p *C.psync_engine) error {
		var out *C.char
		var cerr *C.psync_error
		if err := takeError(f(p, &out, &cerr), cerr); err != nil {
			return err
		}
		defer C.psync_string_free(out)
		s = C.GoString(out)
		return nil
	})
	return s, err
}

// Stats returns the engine's state and counters (the fields of psync_engine_stats_json).
func (e *Engine) Stats() (Stats, error) {
	var st Stats
	text, err := e.text(func(p *C.psync_engine, out **C.char, cerr **C.psync_error) uint32 {
		return C.psync_engine_stats_json_err(p, out, cerr)
	})
	if err != nil {
		return st, err
	}
	err = json.Unmarshal([]byte(text), &st)
	return st, err
}

// Metrics returns the engine's state and counters in the Prometheus text format 0.0.4.
func (e *Engine) Metrics() (string, error) {
	return e.text(func(p *C.psync_engine, out **C.char, cerr **C.psync_error) uint32 {
		return C.psync_engine_metrics_err(p, out, cerr)
	})
}

// Shutdown stops the engine and joins its threads; outcomes not taken yet can still be read.
func (e *Engine) Shutdown() error {
	return e.call(func(p *C.psync_engine) error {
		var cerr *C.psync_error
		return takeError(C.psync_engine_shutdown_err(p, &cerr), cerr)
	})
}

// Close shuts the engine down if needed and frees it. Later calls return ErrClosed; the
// channels of Outcomes are closed.
func (e *Engine) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.ptr == nil {
		return ErrClosed
	}
	var cerr *C.psync_error
	err := takeError(C.psync_engine_shutdown_err(e.ptr, &cerr), cerr)
	if errors.Is(err, StatusEngineShutDown) {
		err = nil
	}
	C.psync_engine_free(e.ptr)
	e.ptr = nil
	return err
}

// Stats are the engine's state and counters.
type Stats struct {
	CommandsPending      uint64                 `json:"commands_pending"`
	QueuedIdentifiers    uint64                 `json:"queued_identifiers"`
	WaitingEvents        uint64                 `json:"waiting_events"`
	AwaitingRefs         uint64                 `json:"awaiting_refs"`
	InFlight             uint64                 `json:"in_flight"`
	Workers              uint64                 `json:"workers"`
	Submitted            uint64                 `json:"submitted"`
	AlreadySatisfied     uint64                 `json:"already_satisfied"`
	Refused              uint64                 `json:"refused"`
	Released             uint64                 `json:"released"`
	Expired              uint64                 `json:"expired"`
	Cancelled            uint64                 `json:"cancelled"`
	Rechecks             uint64                 `json:"rechecks"`
	RefUpdatesApplied    uint64                 `json:"ref_updates_applied"`
	RefUpdateFailures    uint64                 `json:"ref_update_failures"`
	FetchesStarted       uint64                 `json:"fetches_started"`
	Requests             uint64                 `json:"requests"`
	RequestsPerRelease   *float64               `json:"requests_per_release"`
	FetchesSucceeded     uint64                 `json:"fetches_succeeded"`
	FetchesPartial       uint64                 `json:"fetches_partial"`
	FetchesFailed        uint64                 `json:"fetches_failed"`
	MemoryLeaked         uint64                 `json:"memory_leaked"`
	BytesReceived        uint64                 `json:"bytes_received"`
	Failures             map[string]uint64      `json:"failures"`
	Domains              map[string]DomainStats `json:"domains"`
	ExpiredIDsRemembered uint64                 `json:"expired_ids_remembered"`
}

// DomainStats are the counters of one domain.
type DomainStats struct {
	InFlight          uint64            `json:"in_flight"`
	QueuedIdentifiers uint64            `json:"queued_identifiers"`
	RequestsStarted   uint64            `json:"requests_started"`
	Requests          uint64            `json:"requests"`
	Succeeded         uint64            `json:"succeeded"`
	Partial           uint64            `json:"partial"`
	Failed            map[string]uint64 `json:"failed"`
	BytesReceived     uint64            `json:"bytes_received"`
	NextCellInMs      uint64            `json:"next_cell_in_ms"`
}

// LogLevel is a log level; LogOff turns the log off.
type LogLevel int

// The log levels of purgatory_sync.h.
const (
	LogOff   LogLevel = C.PSYNC_LOG_OFF
	LogError LogLevel = C.PSYNC_LOG_ERROR
	LogWarn  LogLevel = C.PSYNC_LOG_WARN
	LogInfo  LogLevel = C.PSYNC_LOG_INFO
	LogDebug LogLevel = C.PSYNC_LOG_DEBUG
	LogTrace LogLevel = C.PSYNC_LOG_TRACE
)

// LogFunc receives the engine's log records: the level, the module the record comes from and
// the message. It is called on the engine's threads, several at once: it must be safe for
// concurrent use and return quickly.
type LogFunc func(level LogLevel, target, message string)

var logMu sync.Mutex
var logHandle cgo.Handle

// SetLogger sends the engine's log (at level and more severe) to f, for every engine of the
// process; LogOff, or a nil f, stops it.
func SetLogger(level LogLevel, f LogFunc) error {
	logMu.Lock()
	defer logMu.Unlock()
	if f == nil {
		level = LogOff
		f = func(LogLevel, string, string) {}
	}
	h := cgo.NewHandle(f)
	var cerr *C.psync_error
	if err := takeError(C.psync_go_log_to(C.psync_log_level(level), C.uintptr_t(h), &cerr), cerr); err != nil {
		h.Delete()
		return err
	}
	// The library uses the new handle from now on; the old one may go.
	if logHandle != 0 {
		logHandle.Delete()
	}
	logHandle = h
	return nil
}

// LogToStderr sends the engine's log (at level and more severe) to standard error.
func LogToStderr(level LogLevel) error {
	var cerr *C.psync_error
	return takeError(C.psync_log_to_stderr(uint32(level), &cerr), cerr)
}

//export psyncGoLog
func psyncGoLog(handle C.uintptr_t, level C.int, target *C.char, message *C.char) {
	f, ok := cgo.Handle(handle).Value().(LogFunc)
	if !ok {
		return
	}
	f(LogLevel(level), C.GoString(target), C.GoString(message))
}

// Version is the version of the libpurgatory_sync linked in.
func Version() string {
	return C.GoString(C.psync_version())
}
