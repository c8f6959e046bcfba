// A room-less WebSocket broadcast hub on gorilla/websocket: the Go peer that scripts/bench runs
// beside wschat (driven by `wschat-load --raw`), written the way a gorilla user would. Not part
// of wschat.
//
//	bench-peer-go [PORT]      (PORT 0 or absent: an ephemeral port)
//
// Listens on 127.0.0.1 only, accepts any path, and sends every text frame it receives to every
// connected client, the sender included, unchanged. Binary frames are ignored. Prints
// "go-gorilla listening: ws://127.0.0.1:PORT/" once it accepts; exits on SIGINT/SIGTERM.
//
// Built by scripts/bench with Debian's golang-go and golang-github-gorilla-websocket-dev, in
// GOPATH mode (GO111MODULE=off GOPATH=/usr/share/gocode): no module download.
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"

	"github.com/gorilla/websocket"
)

// maxMessageBytes is the largest message accepted: wschat's default, and the other peers'.
const maxMessageBytes = 64 * 1024

// queueFrames bounds what waits for one client; a client that lets it fill is dropped.
const queueFrames = 1024

type client struct {
	conn  *websocket.Conn
	queue chan []byte
}

type hub struct {
	mu      sync.Mutex
	clients map[*client]struct{}
}

func (h *hub) add(c *client) {
	h.mu.Lock()
	h.clients[c] = struct{}{}
	h.mu.Unlock()
}

// remove closes the client's queue once, under the lock, so broadcast never sends on it after.
func (h *hub) remove(c *client) {
	h.mu.Lock()
	if _, ok := h.clients[c]; ok {
		delete(h.clients, c)
		close(c.queue)
	}
	h.mu.Unlock()
}

func (h *hub) broadcast(text []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for c := range h.clients {
		select {
		case c.queue <- text:
		default: // too slow: dropped, as gorilla's own chat example does
			delete(h.clients, c)
			close(c.queue)
		}
	}
}

var upgrader = websocket.Upgrader{
	ReadBufferSize:  4096,
	WriteBufferSize: 4096,
	CheckOrigin:     func(*http.Request) bool { return true },
}

func (h *hub) serve(w http.ResponseWriter, r *http.Request) {
	conn, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	if tcp, ok := conn.UnderlyingConn().(*net.TCPConn); ok {
		tcp.SetNoDelay(true) // Go's default already; said here as the other peers say it
	}
	conn.SetReadLimit(maxMessageBytes)
	c := &client{conn: conn, queue: make(chan []byte, queueFrames)}
	h.add(c)
	go c.write()
	for {
		kind, text, err := conn.ReadMessage()
		if err != nil {
			break // a close frame is answered by gorilla's default close handler
		}
		if kind == websocket.TextMessage {
			h.broadcast(text)
		}
	}
	h.remove(c)
}

// write drains the client's queue until the hub closes it, then closes the connection.
func (c *client) write() {
	defer c.conn.Close()
	for text := range c.queue {
		if c.conn.WriteMessage(websocket.TextMessage, text) != nil {
			return
		}
	}
}

func main() {
	port := 0
	if len(os.Args) > 1 {
		p, err := strconv.Atoi(os.Args[1])
		if err != nil || p < 0 || p > 65535 {
			fmt.Fprintln(os.Stderr, "usage: bench-peer-go [PORT]")
			os.Exit(2)
		}
		port = p
	}
	listener, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench-peer-go: %v\n", err)
		os.Exit(1)
	}
	h := &hub{clients: make(map[*client]struct{})}
	fmt.Printf("go-gorilla listening: ws://127.0.0.1:%d/\n", listener.Addr().(*net.TCPAddr).Port)
	go func() {
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
		<-stop
		os.Exit(0)
	}()
	http.Serve(listener, http.HandlerFunc(h.serve))
}
