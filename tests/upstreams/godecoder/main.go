// A model server's reading of a request, as Go's standard library gives it: encoding/json into a
// struct (field names matched case-insensitively, the first JSON value read, whatever the
// Content-Type), and mime/multipart's form values for multipart bodies. Used by the differential
// test (tests/test_request_differential.py) as one of the real decoders the gateway must agree with.
//
// Usage: godecoder PORT. Answers every request with JSON:
//   {"json": {"ok": bool, "model": string}, "form": {"ok": bool, "models": [string]},
//    "method", "target", "host", "headers", "body" (base64): the request exactly as it arrived}
package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"os"
)

type chatRequest struct {
	Model string `json:"model"`
}

type jsonReading struct {
	OK    bool   `json:"ok"`
	Model string `json:"model"`
	Set   bool   `json:"set"`
}

type formReading struct {
	OK     bool     `json:"ok"`
	Models []string `json:"models"`
}

type reading struct {
	JSON    jsonReading         `json:"json"`
	Form    formReading         `json:"form"`
	Method  string              `json:"method"`
	Target  string              `json:"target"`
	Host    string              `json:"host"`
	Headers map[string][]string `json:"headers"`
	Body    []byte              `json:"body"`
}

func handle(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	out := reading{Method: r.Method, Target: r.RequestURI, Host: r.Host, Headers: r.Header, Body: body}
	// As many Go servers do: decode the body as JSON, ignoring the media type.
	var parsed map[string]json.RawMessage
	var req chatRequest
	if err := json.NewDecoder(bytes.NewReader(body)).Decode(&req); err == nil {
		out.JSON.OK = true
		out.JSON.Model = req.Model
		if json.Unmarshal(body, &parsed) == nil {
			for key := range parsed {
				if len(key) == 5 && bytes.EqualFold([]byte(key), []byte("model")) {
					out.JSON.Set = true
				}
			}
		}
		if req.Model != "" {
			out.JSON.Set = true
		}
	}
	// Form values, as r.FormValue would see them, for multipart bodies.
	r.Body = io.NopCloser(bytes.NewReader(body))
	if err := r.ParseMultipartForm(32 << 20); err == nil && r.MultipartForm != nil {
		out.Form.OK = true
		out.Form.Models = r.MultipartForm.Value["model"]
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}

func main() {
	if len(os.Args) != 2 {
		os.Stderr.WriteString("usage: godecoder PORT\n")
		os.Exit(2)
	}
	server := &http.Server{Addr: "127.0.0.1:" + os.Args[1], Handler: http.HandlerFunc(handle)}
	if err := server.ListenAndServe(); err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		os.Exit(1)
	}
}
