// bitfold stream width converter (Verilog-2005): IN_N elements of B bits per input beat to OUT_N
// elements per output beat, element order kept (element 0 in the low bits). A buffer of
// IN_N + OUT_N elements: it accepts whenever a whole input word fits and emits whenever it holds
// an output word, so both sides can move in the same cycle and neither ready nor valid depends
// combinationally on the other side. IN_N == OUT_N is a plain wire, or with SLICE = 1 the same
// buffer as a register slice (two words): the ready of the unit after it then no longer reaches
// the unit before it combinationally.
module bf_dwc #(
  parameter IN_N = 1, OUT_N = 1, B = 2,
  parameter SLICE = 0
) (
  input  wire clk,
  input  wire rst,
  input  wire in_valid,
  output wire in_ready,
  input  wire [IN_N*B-1:0] in_data,
  output wire out_valid,
  input  wire out_ready,
  output wire [OUT_N*B-1:0] out_data
);
  generate
    if (IN_N == OUT_N && !SLICE) begin : pass
      assign out_valid = in_valid;
      assign in_ready = out_ready;
      assign out_data = in_data;
    end else begin : gear
      localparam CAP = IN_N + OUT_N;
      localparam CB = $clog2(CAP + 1);
      reg [CAP*B-1:0] buffer;
      reg [CB-1:0] count;
      assign out_valid = (count >= OUT_N);
      // ready is a register (the next cycle's room): from the reset copy through a LUT it was the
      // start of a path across the device into the unit before (its FIFO pop and credit counter;
      // 11.0 ns, 8.8 of them routing, on the digits CNN W4A4). The reset is the power-on one only,
      // so ready rising a cycle after it falls loses nothing.
      reg rdy = 1'b0;
      assign in_ready = rdy;
      assign out_data = buffer[OUT_N*B-1:0];
      wire pop = out_valid && out_ready;
      wire push = in_valid && in_ready;
      wire [CB-1:0] kept = pop ? count - OUT_N : count;
      wire [CB:0] count_d = kept + (push ? IN_N : 0);   // the next count
      wire [CAP*B-1:0] shifted = pop ? (buffer >> (OUT_N*B)) : buffer;
      wire [CAP*B-1:0] incoming = {{((CAP-IN_N)*B){1'b0}}, in_data};
      always @(posedge clk) begin
        rdy <= !rst && (count_d + IN_N <= CAP);
        if (rst) begin
          count <= 0;
          buffer <= {CAP*B{1'b0}};
        end else begin
          buffer <= push ? (shifted | (incoming << (kept * B))) : shifted;
          count <= count_d;
        end
      end
    end
  endgenerate
endmodule
