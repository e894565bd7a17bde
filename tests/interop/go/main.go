// Interop client on the official Go library (Debian's golang-thrift-dev).
//
// Usage: client HOST PORT binary|compact framed|buffered|header on|off CA_FILE|-
//
// Runs the scenario of tests/interop/test_clients.py on one connection, then a
// second one, printing one JSON line per check; stops with status 1 at the
// first check that fails (a broken connection would fail the rest slowly).
//
// With INTEROP_SCENARIO=lone-oneway it runs tests/interop/test_go_oneway.py's
// instead: notify (sent as CALL, as this library sends oneway methods), then
// nothing until a line comes on stdin, then add on the same connection.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/apache/thrift/lib/go/thrift"

	"interop"
)

func report(check string, err error) {
	line := map[string]interface{}{"lang": "go", "check": check, "ok": err == nil}
	if err != nil {
		line["detail"] = err.Error()
	}
	out, _ := json.Marshal(line)
	fmt.Println(string(out))
	if err != nil {
		os.Exit(1)
	}
}

type conn struct {
	trans  thrift.TTransport
	proto  thrift.TProtocol
	client *interop.InteropClient
}

func open(host string, port string, protocol string, transport string, useTLS bool, caFile string) (*conn, error) {
	conf := &thrift.TConfiguration{ConnectTimeout: 10 * time.Second, SocketTimeout: 5 * time.Second}
	addr := net.JoinHostPort(host, port)
	var sock thrift.TTransport
	if useTLS {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, errors.New("no certificate in " + caFile)
		}
		conf.TLSConfig = &tls.Config{RootCAs: pool, ServerName: host}
		sock = thrift.NewTSSLSocketConf(addr, conf)
	} else {
		sock = thrift.NewTSocketConf(addr, conf)
	}
	var trans thrift.TTransport
	var proto thrift.TProtocol
	switch transport {
	case "framed":
		trans = thrift.NewTFramedTransportConf(sock, conf)
	case "buffered":
		trans = thrift.NewTBufferedTransport(sock, 8192)
	case "header":
		id := thrift.THeaderProtocolBinary
		if protocol == "compact" {
			id = thrift.THeaderProtocolCompact
		}
		conf.THeaderProtocolID = &id
		trans = thrift.NewTHeaderTransportConf(sock, conf)
		proto = thrift.NewTHeaderProtocolConf(trans, conf)
	default:
		return nil, errors.New("unknown transport " + transport)
	}
	if proto == nil {
		if protocol == "compact" {
			proto = thrift.NewTCompactProtocolConf(trans, conf)
		} else {
			proto = thrift.NewTBinaryProtocolConf(trans, conf)
		}
	}
	if err := trans.Open(); err != nil {
		return nil, err
	}
	return &conn{trans, proto, interop.NewInteropClient(thrift.NewTStandardClient(proto, proto))}, nil
}

func expect(cond bool, format string, args ...interface{}) error {
	if cond {
		return nil
	}
	return fmt.Errorf(format, args...)
}

func sample() *interop.AllTypes {
	leaf := &interop.Leaf{Label: "leaf-ü", Weight: math.MinInt32}
	desc := "zero"
	items := []*interop.Item{}
	for i := int64(0); i < 3; i++ {
		item := &interop.Item{ID: i, Name: "item-" + strconv.FormatInt(i, 10), Price: float64(i) * 1.5,
			Tags: []string{}, Attributes: map[string]string{"k": "v", "": ""}, Status: interop.Status_BACKORDERED}
		if i == 0 {
			item.Description = &desc
		} else {
			item.Tags = []string{"a", "b"}
		}
		items = append(items, item)
	}
	binary := make([]byte, 256)
	for i := range binary {
		binary[i] = byte(i)
	}
	optional := "present"
	return &interop.AllTypes{
		ABool: true, AByte: math.MinInt8, AnI16: math.MaxInt16, AnI32: math.MinInt32, AnI64: math.MaxInt64,
		ADouble: -math.MaxFloat64, AString: "héllo wörld ✓ 日本語 🎉", ABinary: binary,
		AList:        []int32{0, -1, math.MaxInt32, math.MinInt32},
		ASet:         []string{"x", "y", "ünïcode"},
		AMap:         map[string]int64{"min": math.MinInt64, "max": math.MaxInt64},
		ItemsByGroup: map[string][]*interop.Item{"all": items, "none": {}},
		Inner:        &interop.Inner{Name: "inner", Leaf: leaf, Leaves: []*interop.Leaf{leaf, {Label: "", Weight: 0}}, MaybeLeaf: leaf},
		Status:       interop.Status_ARCHIVED,
		AUnion:       &interop.Value{ListValue: []string{"one", "two"}},
		AnOptional:   &optional, WithDefault: -1, StringWithDefault: "",
		Deep:             []map[int32][]int64{{1: {math.MinInt64, math.MaxInt64}, -5: {}}, {}},
		BinariesByStatus: map[interop.Status][][]byte{interop.Status_AVAILABLE: {{0x00, 0xff}, {}}, interop.Status_ARCHIVED: {{0x80, 0x01}}},
		OptionalInners:   []*interop.Inner{{Name: "only", Leaf: leaf, Leaves: []*interop.Leaf{}}},
		SmallNumbers:     []int16{math.MinInt16, 0, math.MaxInt16},
		Flags:            []bool{true, false, true},
		ByteToDouble:     map[int8]float64{math.MaxInt8: math.Inf(1), -1: 0.1, math.MinInt8: 5e-324},
		Matrix:           [][]string{{"a"}, {}, {"b", "c"}},
	}
}

// sortSets puts every set of an AllTypes in order: Go decodes a set as a slice
// in wire order, and a server may send a set's elements in any order.
func sortSets(v *interop.AllTypes) {
	sort.Strings(v.ASet)
	sort.Slice(v.SmallNumbers, func(i, j int) bool { return v.SmallNumbers[i] < v.SmallNumbers[j] })
	for _, m := range v.Deep {
		for _, s := range m {
			sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		}
	}
	for _, items := range v.ItemsByGroup {
		for _, item := range items {
			sort.Strings(item.Tags)
		}
	}
}

func checkEchoAll(ctx context.Context, c *interop.InteropClient) error {
	sent := sample()
	got, err := c.EchoAll(ctx, sent)
	if err != nil {
		return err
	}
	if err := expect(got.AnI64 == math.MaxInt64 && got.AByte == math.MinInt8 && got.AnI32 == math.MinInt32 &&
		got.AnI16 == math.MaxInt16 && got.ADouble == -math.MaxFloat64 && got.AMap["min"] == math.MinInt64 &&
		bytes.Equal(got.ABinary, sent.ABinary) && got.AString == sent.AString,
		"base types changed: %+v", got); err != nil {
		return err
	}
	sortSets(sent)
	sortSets(got)
	return expect(got.Equals(sent), "echoAll returned %+v, sent %+v", got, sent)
}

func checkExceptions(ctx context.Context, c *interop.InteropClient) error {
	_, err := c.GetItem(ctx, -7)
	var nf *interop.NotFound
	if !errors.As(err, &nf) || nf.ID != -7 || nf.Message != "no item -7" {
		return fmt.Errorf("getItem(-7): want NotFound(-7), got %v", err)
	}
	_, err = c.GetItem(ctx, interop.BUSY_ITEM_ID)
	var busy *interop.ServiceBusy
	if !errors.As(err, &busy) || busy.Message != "busy, try later" || busy.RetryAfterMs != 50 {
		return fmt.Errorf("getItem(BUSY): want ServiceBusy, got %v", err)
	}
	_, err = c.PlaceOrder(ctx, &interop.Order{Customer: "x", Lines: []*interop.OrderLine{}})
	var invalid *interop.InvalidOrder
	if !errors.As(err, &invalid) || invalid.Reason != "an order needs at least one line" {
		return fmt.Errorf("placeOrder(no lines): want InvalidOrder, got %v", err)
	}
	return nil
}

func checkItems(ctx context.Context, c *interop.InteropClient) error {
	item, err := c.GetItem(ctx, 4)
	if err != nil {
		return err
	}
	if err := expect(item.ID == 4 && item.Name == "item-4" && item.Price == 6.0 && len(item.Tags) == 1 &&
		item.Tags[0] == "even" && item.Attributes["id"] == "4" && len(item.Attributes) == 1 &&
		item.Status == interop.Status_AVAILABLE && item.Description != nil && *item.Description == "the item numbered 4",
		"getItem(4) = %+v", item); err != nil {
		return err
	}
	items, err := c.ListItems(ctx, 3)
	if err != nil {
		return err
	}
	if err := expect(len(items) == 3 && items[0].ID == 1 && items[2].ID == 3 && items[2].Description == nil,
		"listItems(3) = %v", items); err != nil {
		return err
	}
	receipt, err := c.PlaceOrder(ctx, &interop.Order{Customer: "c", Lines: []*interop.OrderLine{{ItemId: 2, Quantity: 3}}})
	if err != nil {
		return err
	}
	return expect(receipt.Customer == "c" && receipt.Total == 9.0 && receipt.ItemCount == 3 && receipt.OrderId > 0,
		"placeOrder = %+v", receipt)
}

func checkAdd(ctx context.Context, c *interop.InteropClient, a, b, want int64) error {
	got, err := c.Add(ctx, a, b)
	if err != nil {
		return err
	}
	return expect(got == want, "add(%d, %d) = %d", a, b, got)
}

func checkUndeclared(ctx context.Context, c *interop.InteropClient) error {
	err := c.Crash(ctx)
	var tae thrift.TApplicationException
	if !errors.As(err, &tae) || tae.TypeId() != thrift.INTERNAL_ERROR {
		return fmt.Errorf("crash(): want TApplicationException INTERNAL_ERROR, got %v", err)
	}
	return checkAdd(ctx, c, 1, 2, 3)
}

func checkOneway(ctx context.Context, c *interop.InteropClient, tag string) error {
	if err := c.Notify(ctx, tag); err != nil {
		return err
	}
	if err := checkAdd(ctx, c, 40, 2, 42); err != nil {
		return fmt.Errorf("call after oneway: %w", err)
	}
	for i := 0; i < 100; i++ {
		tags, err := c.Notifications(ctx)
		if err != nil {
			return err
		}
		for _, t := range tags {
			if t == tag {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("notify(%s) not delivered within 10 s", tag)
}

func checkLargeBinary(ctx context.Context, c *interop.InteropClient) error {
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i*7 + i>>8)
	}
	got, err := c.EchoBinary(ctx, data)
	if err != nil {
		return err
	}
	return expect(bytes.Equal(got, data), "echoBinary: %d bytes back, different", len(got))
}

// checkPipelined writes three calls before reading any reply.
func checkPipelined(ctx context.Context, cn *conn) error {
	p := cn.proto
	for i := int32(0); i < 3; i++ {
		if err := p.WriteMessageBegin(ctx, "add", thrift.CALL, 1000+i); err != nil {
			return err
		}
		args := interop.InteropAddArgs{A: int64(i), B: 100}
		if err := args.Write(ctx, p); err != nil {
			return err
		}
		if err := p.WriteMessageEnd(ctx); err != nil {
			return err
		}
		if err := p.Flush(ctx); err != nil {
			return err
		}
	}
	for i := int32(0); i < 3; i++ {
		name, mtype, seqid, err := p.ReadMessageBegin(ctx)
		if err != nil {
			return err
		}
		if name != "add" || mtype != thrift.REPLY || seqid != 1000+i {
			return fmt.Errorf("reply %d: %s type %d seqid %d", i, name, mtype, seqid)
		}
		var result interop.InteropAddResult
		if err := result.Read(ctx, p); err != nil {
			return err
		}
		if err := p.ReadMessageEnd(ctx); err != nil {
			return err
		}
		if result.Success == nil || *result.Success != int64(i)+100 {
			return fmt.Errorf("reply %d: %v", i, result.Success)
		}
	}
	return nil
}

func main() {
	if len(os.Args) != 7 {
		fmt.Fprintln(os.Stderr, "usage: client HOST PORT binary|compact framed|buffered|header on|off CA_FILE|-")
		os.Exit(2)
	}
	host, port, protocol, transport, useTLS, ca := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5] == "on", os.Args[6]
	ctx := context.Background()
	cn, err := open(host, port, protocol, transport, useTLS, ca)
	report("connect", err)
	c := cn.client
	tag := "go-" + strconv.Itoa(os.Getpid()) + "-" + strings.Join([]string{protocol, transport, os.Args[5]}, "-")
	if os.Getenv("INTEROP_SCENARIO") == "lone-oneway" {
		report("loneOneway", c.Notify(ctx, tag))
		if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
			report("wait", err)
		}
		report("callAfterLoneOneway", checkAdd(ctx, c, 40, 2, 42))
		return
	}
	report("add", func() error {
		if err := checkAdd(ctx, c, math.MaxInt64-1, 1, math.MaxInt64); err != nil {
			return err
		}
		return checkAdd(ctx, c, math.MinInt64+1, -1, math.MinInt64)
	}())
	report("void", c.Ping(ctx))
	report("echoAll", checkEchoAll(ctx, c))
	report("items", checkItems(ctx, c))
	report("declaredExceptions", checkExceptions(ctx, c))
	report("undeclaredError", checkUndeclared(ctx, c))
	report("oneway", checkOneway(ctx, c, tag))
	report("largeBinary", checkLargeBinary(ctx, c))
	report("pipelined", checkPipelined(ctx, cn))
	cn.trans.Close()
	report("reconnect", func() error {
		again, err := open(host, port, protocol, transport, useTLS, ca)
		if err != nil {
			return err
		}
		defer again.trans.Close()
		if err := checkAdd(ctx, again.client, -5, 8, 3); err != nil {
			return err
		}
		return again.client.Ping(ctx)
	}())
}
